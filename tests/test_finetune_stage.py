"""data -> models -> finetune -> report on the embedded cluster: three candidates, two CPU workers each,
ASHA stops the clearly worse one, a fourth that failed upstream is reported failed; ranking.json, the
report and its plots; `damoc report` and `compare`."""

from __future__ import annotations

import base64
import json
import re

import pytest
from conftest import QA_ROWS, spec_dict, write_jsonl
from trainkit import hopeless_copy

from damoc.cli import main
from damoc.pipeline import Pipeline
from damoc.runtime import connect
from damoc.spec import spec_from_data
from test_model_stage import unsupported_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.mark.slow
def test_three_candidates_ranked_weak_one_stopped_early(tmp_path, tiny_model, tokenizer_dir):
    write_jsonl(tmp_path / "data" / "train.jsonl", QA_ROWS * 3)
    good = tiny_model("llama", hidden=32, layers=4)
    spec = spec_from_data(spec_dict(**{
        "data.filter": {"method": "none"}, "data.compress": {"enabled": False}, "data.eval": {"split_ratio": 0.2},
        "candidates": [{"name": "llama-a", "path": str(good)},
                       {"name": "gpt2-b", "path": str(tiny_model("gpt2", hidden=32, layers=4))},
                       {"name": "llama-bad", "path": str(hopeless_copy(good, tmp_path / "bad"))},
                       {"name": "bloom-x", "path": str(unsupported_model(tmp_path / "bloom", tokenizer_dir))}],
        "model": {"prune_ratio": 0.5, "calibration": {"rows": 8, "batch_size": 4}},
        "finetune": {"num_workers": 2, "max_steps": 8, "eval_every": 4, "batch_size": 4, "lr": 5e-3},
        "tune": {"grace_period": 4, "reduction_factor": 2}}), base_dir=str(tmp_path))
    pipeline = Pipeline(spec, base_dir=tmp_path, runtime_factory=lambda: connect(None, num_cpus=6))
    outcomes = pipeline.run()
    assert [o.name for o in outcomes] == ["data", "models", "finetune", "report"]
    run = pipeline.run_dir

    ranking = json.loads((run / "report" / "ranking.json").read_text())
    by_name = {c["name"]: c for c in ranking["candidates"]}
    assert ranking["metric"] == "eval_loss" and set(by_name) == {"llama-a", "gpt2-b", "llama-bad", "bloom-x"}
    failed = by_name["bloom-x"]  # failed in the model stage: listed, unranked, with its reason
    assert failed["status"] == "failed" and failed["rank"] is None and "model_type 'bloom'" in failed["reason"]
    bad = by_name["llama-bad"]
    assert bad["status"] == "stopped_early" and bad["stopped_early"] and bad["steps"] == 4 and bad["rank"] == 3
    for name in ("llama-a", "gpt2-b"):
        c = by_name[name]
        assert c["status"] == "finished" and c["steps"] == 8 and c["rank"] in (1, 2)
        assert c["score"] < bad["score"] and c["train_tokens"] > 0 and c["train_flops"] > 0
        assert c["worker_seconds"] > 0
    cost = ranking["cost"]
    assert set(cost["stages"]) == {"data", "models", "finetune"} and cost["worker_seconds"] > 0

    html = (run / "report" / "report.html").read_text()
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)  # embedded: the page travels alone
    assert len(images) >= 4 and all(base64.b64decode(i).startswith(PNG_MAGIC) for i in images)
    for name in ("learning_curves.png", "cost.png", "data_funnel.png", "layers.png"):  # and kept beside it
        assert (run / "report" / name).read_bytes().startswith(PNG_MAGIC), name
    assert "llama-bad" in html and "stopped_early" in html and "bloom-x" in html

    # `damoc report` rewrites the report from the run's files; `compare` of a run with itself agrees fully.
    (run / "report" / "report.md").unlink()
    assert main(["report", str(run)]) == 0 and (run / "report" / "report.md").is_file()
    assert (run / "report" / "_stage.json").is_file()
    assert main(["compare", str(run), str(run), "--json"]) == 0


@pytest.mark.slow
def test_stop_when_decided_ranks_as_finishing_the_winner_does(tmp_path, tiny_model):
    """ASHA (rungs at 2 and 4, rf 2) keeps two of three candidates at step 2 and one at step 4: the
    selection is decided there. Stopping the winner at step 4 (the default) and training it to step 8
    (tune.finish_winner) give the same ranking; only the winner's last step differs."""
    import shutil

    write_jsonl(tmp_path / "data" / "train.jsonl", QA_ROWS * 3)
    good = tiny_model("llama", hidden=32, layers=2)
    base = spec_dict(**{
        "data.filter": {"method": "none"}, "data.compress": {"enabled": False}, "data.eval": {"split_ratio": 0.2},
        "candidates": [{"name": "llama-a", "path": str(good)},
                       {"name": "gpt2-b", "path": str(tiny_model("gpt2", hidden=32, layers=2))},
                       {"name": "llama-bad", "path": str(hopeless_copy(good, tmp_path / "bad"))}],
        "model": {"enabled": False},
        "finetune": {"num_workers": 1, "max_steps": 8, "eval_every": 2, "batch_size": 4, "lr": 5e-3},
        # ASHA's cut alone (the steady-ranking rule is tested below): the curves of a and b cross at step 2
        "tune": {"grace_period": 2, "reduction_factor": 2, "callbacks": ["tensorboard"], "stop_confidence": 0}})
    rt = connect(None, num_cpus=4)  # three one-worker trials at once: every rung is synchronised
    shared = type("Shared", (), {"address": rt.address})()
    try:
        first = Pipeline(spec_from_data(base, base_dir=str(tmp_path)), base_dir=tmp_path,
                         runtime_factory=lambda: shared)
        first.run(["data", "models", "finetune", "report"])
        shutil.copytree(first.run_dir, tmp_path / "runs" / "finish")
        base["output_dir"], base["tune"]["finish_winner"] = "runs/finish", True
        second = Pipeline(spec_from_data(base, base_dir=str(tmp_path)), base_dir=tmp_path,
                          runtime_factory=lambda: shared)
        second.run(["finetune", "report"])
    finally:
        rt.shutdown()

    decided = json.loads((first.run_dir / "report" / "ranking.json").read_text())
    finished = json.loads((second.run_dir / "report" / "ranking.json").read_text())
    assert [c["name"] for c in decided["candidates"]] == [c["name"] for c in finished["candidates"]]
    assert decided["decided_at"] == finished["decided_at"] == 4 and finished["finish_winner"]
    win, win_full = decided["candidates"][0], finished["candidates"][0]
    # the winner's trial ended at the deciding rung (it holds there until the driver stops it)
    assert win["status"] == "decided" and win["steps"] == 4
    assert win_full["status"] == "finished" and win_full["steps"] == 8
    assert decided["candidates"][-1]["name"] == "llama-bad" and decided["candidates"][-1]["steps"] == 2
    for a, b in zip(decided["candidates"][1:], finished["candidates"][1:]):  # the stopped ones are the same
        assert (a["status"], a["steps"], a["score"]) == ("stopped_early", b["steps"], b["score"])
    results = json.loads((first.run_dir / "finetune" / "results.json").read_text())
    for e in results["candidates"]:  # every trial's timeline adds up to its wall time
        t = e["timeline"]
        assert t["fixed"] > 0 and t["training"] > 0 and t["total"] <= e["trial_seconds"] + 1.0
    report = (first.run_dir / "report" / "report.md").read_text()
    assert "Decided at step 4" in report and "Trial timelines" in report
    # tune.callbacks [tensorboard]: each candidate's curve in TensorBoard event files of the sweep
    events = list((first.run_dir / ".finetune-state").rglob("events.out.tfevents.*"))
    assert {n for n in ("llama-a", "gpt2-b", "llama-bad") if any(n in str(e) for e in events)} == {
        "llama-a", "gpt2-b", "llama-bad"}, events
    # the winner's adapter, in PEFT's format, loads on the compressed model and scores what the report says
    win = decided["candidates"][0]
    assert win["adapter"]["step"] == win["steps"] == 4
    from damoc.lm.load import load_causal_lm
    from damoc.train.args import train_args
    from damoc.train.evaluate import EvalSet, evaluate
    from damoc.train.loop import read_rows
    from peft import PeftModel

    path = {c["name"]: c["path"] for c in base["candidates"]}[win["name"]]
    tok, model = load_causal_lm(path)  # model stage off: the candidate as it is is the one trained
    model = PeftModel.from_pretrained(model, str(first.run_dir / "finetune" / win["adapter"]["path"]))
    js = spec_from_data(base, base_dir=str(tmp_path), check_files=False)
    args = train_args(js, win["name"], path, "", "", [], None, False, 8)
    rows = read_rows(str(first.run_dir / "data" / "eval.parquet"), js.finetune.eval_max_rows)
    got = evaluate(model, tok, EvalSet(tok, rows, args, 0, 1), args, "cpu", generation=False)["eval_loss"]
    assert got == pytest.approx(win["score"], rel=1e-4)


def nan_copy(src, dst):
    """A copy whose final norm is NaN: every loss is NaN, whatever the step."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


@pytest.mark.slow
def test_twins_are_never_told_apart_by_a_rung(tmp_path, tiny_model):
    """Two copies of one model train alike: the rung at step 2 cannot rank them (each is behind the other in
    no paired resample), so neither is stopped there although ASHA's cut keeps one; both finish, and the
    terminal, results.json and the report say why."""
    write_jsonl(tmp_path / "data" / "train.jsonl", QA_ROWS * 2)
    good = tiny_model("llama", hidden=32, layers=2)
    spec = spec_from_data(spec_dict(**{
        "data.filter": {"method": "none"}, "data.compress": {"enabled": False}, "data.eval": {"split_ratio": 0.2},
        "candidates": [{"name": "twin-a", "path": str(good)}, {"name": "twin-b", "path": str(good)}],
        "model": {"enabled": False},
        "finetune": {"num_workers": 1, "max_steps": 4, "eval_every": 2, "batch_size": 4, "lr": 5e-3},
        "tune": {"grace_period": 2, "reduction_factor": 2}}), base_dir=str(tmp_path))
    pipeline = Pipeline(spec, base_dir=tmp_path, runtime_factory=lambda: connect(None, num_cpus=2))
    pipeline.run()
    results = json.loads((pipeline.run_dir / "finetune" / "results.json").read_text())
    assert results["rungs"] == [2]
    by_name = {e["name"]: e for e in results["candidates"]}
    assert [by_name[n]["status"] for n in ("twin-a", "twin-b")] == ["finished", "finished"]
    assert all(e["warmup_steps"] == 1 and 0 < e["warmup_seconds"] < e["timeline"]["training"] for e in by_name.values())
    why = [e.get("kept_because", {}) for e in by_name.values()]
    assert sorted(map(len, why)) == [0, 1]  # the one below the cut went on, and says why
    assert "behind the best 1 in 0% of paired resamples" in next(w["2"] for w in why if w)
    assert "The ranking came before the saving" in (pipeline.run_dir / "report" / "report.md").read_text()


@pytest.mark.slow
def test_nan_candidate_fails_and_a_short_window_is_cut(tmp_path, tiny_model, tokenizer_dir):
    """One candidate's loss is NaN: it ends `failed` with that reason after finetune.max_failures retries, the
    others are ranked. With max_length 4096, a GPT-2 with a 64-position window meets rows longer than its
    window: its sequences are cut to 64 tokens (its note says how many rows) instead of failing every step;
    the Llama's 512-token window cuts no row, and nothing is said of it."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from damoc.zoo.tiny import build_tiny_model

    long_rows = [{"instruction": "Summarise: " + " ".join(f"w{i}" for i in range(60)), "input": "", "output": "ok"}]
    write_jsonl(tmp_path / "data" / "train.jsonl", QA_ROWS * 2 + long_rows * 6)
    good = tiny_model("llama", hidden=32, layers=2)
    short = build_tiny_model("gpt2", tmp_path / "gpt2-64", AutoTokenizer.from_pretrained(tokenizer_dir),
                             hidden=32, layers=2, max_positions=64)
    spec = spec_from_data(spec_dict(**{
        "data.filter": {"method": "none"}, "data.compress": {"enabled": False}, "data.eval": {"split_ratio": 0.2},
        "candidates": [{"name": "llama-a", "path": str(good)}, {"name": "gpt2-64", "path": str(short)},
                       {"name": "llama-nan", "path": str(nan_copy(good, tmp_path / "nan"))}],
        "model": {"enabled": False},
        "finetune": {"num_workers": 1, "max_steps": 4, "eval_every": 2, "batch_size": 4, "lr": 5e-3,
                     "max_failures": 1, "max_length": 4096},
        "tune": {"grace_period": 2, "reduction_factor": 2, "finish_winner": True}}),
        base_dir=str(tmp_path))
    pipeline = Pipeline(spec, base_dir=tmp_path, runtime_factory=lambda: connect(None, num_cpus=4))
    pipeline.run()
    ranking = json.loads((pipeline.run_dir / "report" / "ranking.json").read_text())
    by = {c["name"]: c for c in ranking["candidates"]}
    nan = by["llama-nan"]
    assert nan["status"] == "failed" and nan["rank"] is None and "training loss is nan" in nan["reason"]
    assert {by["llama-a"]["rank"], by["gpt2-64"]["rank"]} == {1, 2}
    train_rows = pq.ParquetFile(pipeline.run_dir / "data" / "train.parquet").metadata.num_rows
    long_kept = sum(r.startswith("Summarise") for r in pq.read_table(
        pipeline.run_dir / "data" / "train.parquet", columns=["instruction"]).column("instruction").to_pylist())
    assert by["gpt2-64"]["note"] == (f"{long_kept} of {train_rows} training rows cut to its 64-token context window "
                                     "(finetune.max_length 4096)") and long_kept > 0
    assert "context window" not in (by["llama-a"].get("note") or "")  # a 512-token window no row reaches
    results = json.loads((pipeline.run_dir / "finetune" / "results.json").read_text())
    assert {e["name"]: e["attempts"] for e in results["candidates"]}["llama-nan"] <= 2  # not retried forever
