"""The house rules: stages meet only through the run directory and the shared layers; every stage
builds a row's text with the same function."""

from __future__ import annotations

import ast
from pathlib import Path

import damoc

STAGES = ("data", "model", "train", "report")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_no_stage_package_imports_another_stage():
    root = Path(damoc.__file__).parent
    crossings = []
    for stage in STAGES:
        for path in sorted((root / stage).rglob("*.py")):
            for module in imported_modules(path):
                parts = module.split(".")
                if parts[0] == "damoc" and len(parts) > 1 and parts[1] in STAGES and parts[1] != stage:
                    crossings.append(f"{path.relative_to(root)} imports {module}")
    assert not crossings, "\n".join(crossings)


def test_data_stage_tasks_do_not_import_torch():
    """The data stage's read and map tasks unpickle their functions from damoc.data.stage: a fresh worker
    process imports it, and torch (a second on 2 cores) only where a model runs."""
    import subprocess
    import sys

    code = "import sys, damoc.data.stage, damoc.data.ops; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_calibration_ifd_compression_and_training_render_the_same_text(tokenizer_dir, tiny_model, monkeypatch):
    """One row, one task: the text the model stage calibrates on, the data stage scores (IFD) and compresses,
    and the finetune stage trains and evaluates on comes from one function (damoc.lm.prompts.render)."""
    from transformers import AutoTokenizer

    import damoc.data.lm as data_lm
    import damoc.lm.prompts as prompts
    import damoc.model.compress as model_compress
    import damoc.train.evaluate as train_evaluate
    import damoc.train.loop as train_loop
    from damoc.data.lm import CompressArgs, LMScorer
    from damoc.spec import spec_from_data
    from damoc.train.args import train_args

    row = {"instruction": "What does json.dumps do?", "input": "Signature: dumps(obj)",
           "output": "Serialize obj to a JSON formatted str."}
    seen: dict[str, list[str]] = {}
    real = prompts.render

    def spy(where):
        def render(task, instruction, inp, tok=None, template="plain"):
            p = real(task, instruction, inp, tok, template)
            seen.setdefault(where, []).append(p.text)
            return p
        return render

    model = tiny_model("llama", hidden=32, layers=2)
    tok = AutoTokenizer.from_pretrained(model)
    monkeypatch.setattr(model_compress, "render", spy("calibration"))
    model_compress.calibration_examples(tok, [row], "qa", "auto", 128)
    monkeypatch.setattr(data_lm, "render", spy("ifd+compression"))
    LMScorer(str(model), compress=CompressArgs(0.5))({k: [v] for k, v in row.items()})
    monkeypatch.setattr(train_loop, "prompt_text", lambda *a, **k: spy("training")(*a, **k).text)
    monkeypatch.setattr(train_evaluate, "prompt_text", lambda *a, **k: spy("evaluation")(*a, **k).text)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"id": "1", "source": "t", **row}]), Path(model).parent / "rows.parquet")
    spec = spec_from_data({"name": "t", "data": {"train": {"path": "x.jsonl"}}, "candidates": [{"name": "c", "path": "m"}]},
                          check_files=False)
    args = train_args(spec, "c", str(model), str(Path(model).parent / "rows.parquet"),
                      str(Path(model).parent / "rows.parquet"), [], None, False, 1)
    train_loop.shard_examples(tok, args, 0, 1)
    train_evaluate.EvalSet(tok, [row], args, 0, 1)
    texts = {where: set(t) for where, t in seen.items()}
    assert set(texts) == {"calibration", "ifd+compression", "training", "evaluation"}
    assert len(set.union(*texts.values())) == 1, texts
    assert next(iter(texts["training"])) == "Question: What does json.dumps do?\nSignature: dumps(obj)\nAnswer: "
