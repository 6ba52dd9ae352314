"""Layer pruning and sparse merging on a model whose layers are trained, not random.

With `--model PATH` (a local HF folder, e.g. the real SmolLM2-135M-Instruct of
`damoc zoo build --preset real`): calibrates on QA rows rendered with the model's own prompt
(its chat template), prints Block Influence and angular scores of every layer, then for each
pruning ratio compresses it with plain pruning and with every merge method at each density and
scale, and measures the answer loss (bits per byte) on held-out rows of another domain it was not
calibrated on, and greedy generations before and after. Without `--model`, pretrains a small
Llama-like model on the standard library's source first (a few minutes) and does the same on code.
Results go to bench/results/layer_merge[-NAME].{md,json}. Never run by the test suite.

    .venv/bin/python -m bench.layer_merge --model zoo/real/models/smollm2-135m-instruct \
        --data zoo/real/data/api_qa/train.jsonl --held-out zoo/real/data/general_qa/eval.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from damoc.lm.arch import adapter_for
from damoc.lm.load import load_causal_lm
from damoc.lm.prompts import prompt_text
from damoc.model.compress import Source, calibration_examples, compress_candidate
from damoc.model.merge import MERGE_METHODS
from damoc.model.prune import choose_discrete, n_to_remove
from damoc.model.scores import batches, calibrate, calibration_loss
from damoc.spec import ModelSpec

OUT = Path(__file__).resolve().parent / "results"
PROMPTS = ["What is the capital of France?", "Write one sentence about the sea.",
           "How do I reverse a list in Python?"]


def read_rows(path: Path, n: int) -> list[dict[str, str]]:
    """The first n readable rows of a local file in any layout the data stage reads (its own readers)."""
    from damoc.data.readers import plan_units, read_unit
    from damoc.spec import DataSource, Fields

    rows = [r for u in plan_units(DataSource(path=str(path)), ".") for r in read_unit(u, Fields())
            if r["reason"] is None]
    return [{k: r[k] for k in ("instruction", "input", "output")} for r in rows[:n]]


def generations(folder: Path, template: str, max_new_tokens: int = 24) -> list[str]:
    """Greedy answers to a few fixed prompts, rendered with the model's own template."""
    tok, model = load_causal_lm(str(folder), dtype=torch.float32)
    out = []
    for p in PROMPTS:
        ids = tok(prompt_text("qa", p, "", tok, template), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
        out.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def layer_scores(folder: Path, rows, a) -> dict:
    """BI and angular (one-layer blocks) of every layer; the layers each would remove at every ratio;
    the scoring pass's seconds against a plain forward pass over the same batches."""
    tok, model = load_causal_lm(str(folder), dtype=torch.float32)
    data = batches(calibration_examples(tok, rows, "qa", a.template, a.max_length), 8, tok.pad_token_id or 0)
    t = time.perf_counter()
    calibration_loss(model, data)
    plain = time.perf_counter() - t
    cal = calibrate(model, adapter_for(model.config), data)
    n = len(cal.block_influence)
    picks = {}
    for ratio in a.ratios:
        k = n_to_remove(n, ratio, True)
        picks[str(ratio)] = {"block_influence": choose_discrete(cal.block_influence, k, True),
                             "angular": choose_discrete(cal.angular[0], k, True)}
    return {"layers": n, "block_influence": cal.block_influence, "angular": cal.angular[0], "removed": picks,
            "score_seconds": cal.seconds, "forward_seconds": plain}


def pretrained_toy(tmp: Path, a) -> tuple[Path, list, list]:
    """The no-`--model` path: a small Llama pretrained on stdlib source; rows are code windows."""
    from damoc.zoo.build import CandidatePlan, pretrain_candidate
    from damoc.zoo.corpus import stdlib_source
    from damoc.zoo.tiny import train_tokenizer

    texts = stdlib_source(4_000_000, limit_files=2000)
    train, rest = [t for i, t in enumerate(texts) if i % 8], [t for i, t in enumerate(texts) if not i % 8]
    tok = train_tokenizer(train, 1024)
    tok.save_pretrained(tmp / "tok")
    chunks = [t[i:i + 512] for t in rest for i in range(0, len(t) - 512, 2048)]
    chunks = [chunks[i] for i in torch.randperm(len(chunks), generator=torch.Generator().manual_seed(0))]
    as_rows = [{"instruction": c[:128], "input": "", "output": c[128:]} for c in chunks[: 2 * a.rows]]
    plan = CandidatePlan("bench", "llama", 96, 8, 4, steps=a.steps, mix="code")
    info = pretrain_candidate(plan, str(tmp / "tok"), str(tmp / "model"), train, seq_len=128, batch_size=16,
                              lr=3e-3, seed=a.seed)
    print(f"pretrained {info['params'] / 1e6:.2f}M params, 8 layers, {a.steps} steps; loss {info['final_loss']:.3f}")
    return tmp / "model", as_rows[: a.rows], as_rows[a.rows:]


def sweep(model: Path, calib, held, tmp: Path, a) -> list[dict]:
    """Every ratio x (plain pruning, every merge method x density x scale), through the model stage's own
    compress_candidate; held-out answer loss of each result."""
    runs = []
    for ratio in a.ratios:
        configs = [("none", 1.0, 1.0)] + [(m, d, s) for m in MERGE_METHODS if m != "none"
                                          for d in a.densities for s in a.scales]
        for method, density, scale in configs:
            spec = ModelSpec(prune_ratio=ratio, merge={"method": method, "density": density, "scale": scale},
                             calibration={"rows": len(calib), "max_length": a.max_length, "batch_size": 8})
            out = tmp / f"c-{ratio}-{method}-{density}-{scale}"
            t = time.perf_counter()
            r = compress_candidate(Source("bench", str(model)), calib, spec, out, a.seed, task="qa",
                                   template=a.template, eval_rows=held, max_length=a.max_length)
            runs.append({"ratio": ratio, "method": method, "density": density, "scale": scale,
                         "removed": r["removed"], "calibration_loss": r["calibration_loss"],
                         "held_out_bpb": r["zero_shot"]["compressed"], "original_bpb": r["zero_shot"]["original"],
                         "folder": str(out), "seconds": round(time.perf_counter() - t, 1)})
            print(f"  prune {ratio:.0%} {method:15s} d={density:g} λ={scale:g}: held-out {runs[-1]['held_out_bpb']:.4f} "
                  f"bits/byte (original {runs[-1]['original_bpb']:.4f}), {runs[-1]['seconds']:.0f}s", flush=True)
    return runs


def write(res: dict, name: str) -> str:
    lines = [f"# Layer pruning and merging: {name}", "",
             f"{res['params'] / 1e6:.1f}M parameters, {res['scores']['layers']} layers; calibration on "
             f"{res['calib_rows']} rows of {res['calib_source']}, held-out answer loss on {res['held_rows']} rows of "
             f"{res['held_source']} (never calibrated on), template `{res['template']}`.", "",
             f"Scoring pass {res['scores']['score_seconds']:.2f}s vs plain forward {res['scores']['forward_seconds']:.2f}s "
             f"({res['scores']['score_seconds'] / res['scores']['forward_seconds']:.2f}x).", "",
             "| layer | " + " | ".join(str(i) for i in range(res["scores"]["layers"])) + " |",
             "|---|" + "---|" * res["scores"]["layers"],
             "| BI | " + " | ".join(f"{v:.3f}" for v in res["scores"]["block_influence"]) + " |",
             "| angular | " + " | ".join(f"{v:.3f}" for v in res["scores"]["angular"]) + " |", ""]
    for ratio, picks in res["scores"]["removed"].items():
        lines.append(f"- prune {float(ratio):.0%}: BI removes {picks['block_influence']}, angular removes "
                     f"{picks['angular']}")
    lines += ["", f"Original model: held-out {res['runs'][0]['original_bpb']:.4f} bits/byte.", "",
              "| prune | merge | density | λ | held-out bits/byte | vs plain pruning | calib loss merged |",
              "|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        plain = next(p for p in res["runs"] if p["ratio"] == r["ratio"] and p["method"] == "none")
        lines.append(f"| {r['ratio']:.0%} | {r['method']} | {r['density']:g} | {r['scale']:g} | "
                     f"{r['held_out_bpb']:.4f} | {r['held_out_bpb'] - plain['held_out_bpb']:+.4f} | "
                     f"{r['calibration_loss']['merged']:.3f} |")
    lines += ["", "## Best merge per ratio", ""]
    for ratio, best in res["best"].items():
        lines.append(f"- {float(ratio):.0%}: {best['method']} d={best['density']:g} λ={best['scale']:g}: "
                     f"{best['held_out_bpb']:.4f} vs plain {best['plain_bpb']:.4f} ({best['gain']:+.2%} of the "
                     "plain-pruning loss)")
    lines += ["", "## Greedy generations", ""]
    for label, gens in res["generations"].items():
        lines.append(f"**{label}**")
        lines += [f"- {p!r} → {g!r}" for p, g in zip(PROMPTS, gens)]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a local HF folder (default: pretrain a small code model)")
    ap.add_argument("--data", type=Path, help="QA rows to calibrate on (with --model; any layout the data stage reads)")
    ap.add_argument("--held-out", type=Path, help="QA rows of another domain, for held-out loss")
    ap.add_argument("--template", default="auto", choices=["auto", "chat", "plain"])
    ap.add_argument("--steps", type=int, default=800, help="pretraining steps without --model")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--scales", type=float, nargs="+", default=[0.1, 0.3, 1.0], help="merge scales λ")
    ap.add_argument("--rows", type=int, default=64, help="calibration rows (and as many held-out rows)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="suffix of the results files (keeps an earlier sweep's)")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    with tempfile.TemporaryDirectory(prefix="damoc-merge-") as tmp:
        tmp = Path(tmp)
        if a.model:
            model, name = a.model, a.model.name
            calib, held = read_rows(a.data, a.rows), read_rows(a.held_out, a.rows)
            sources = (str(a.data), str(a.held_out))
        else:
            model, calib, held = pretrained_toy(tmp, a)
            name, sources = "pretrained-toy", ("stdlib source windows", "other stdlib windows")
        scores = layer_scores(model, calib, a)
        print(f"{name}: {scores['layers']} layers; BI {[round(v, 3) for v in scores['block_influence']]}")
        runs = sweep(model, calib, held, tmp, a)
        best, gens = {}, {"original": generations(model, a.template)}
        for ratio in a.ratios:
            plain = next(r for r in runs if r["ratio"] == ratio and r["method"] == "none")
            top = min((r for r in runs if r["ratio"] == ratio and r["method"] != "none"), key=lambda r: r["held_out_bpb"])
            best[str(ratio)] = {**{k: top[k] for k in ("method", "density", "scale", "held_out_bpb")},
                                "plain_bpb": plain["held_out_bpb"],
                                "gain": (top["held_out_bpb"] - plain["held_out_bpb"]) / plain["held_out_bpb"]}
            gens[f"pruned {ratio:.0%}, plain"] = generations(Path(plain["folder"]), a.template)
            gens[f"pruned {ratio:.0%}, {top['method']} d={top['density']:g} λ={top['scale']:g}"] = \
                generations(Path(top["folder"]), a.template)
        tok, m = load_causal_lm(str(model), dtype=torch.float32)
        res = {"model": name, "params": sum(p.numel() for p in m.parameters()), "template": a.template,
               "calib_rows": len(calib), "held_rows": len(held), "calib_source": sources[0],
               "held_source": sources[1], "scores": scores,
               "runs": [{k: v for k, v in r.items() if k != "folder"} for r in runs], "best": best,
               "generations": gens}
        del m
    OUT.mkdir(exist_ok=True)
    stem = ("layer_merge" if not a.model else f"layer_merge-{name}") + (f"-{a.tag}" if a.tag else "")
    (OUT / f"{stem}.json").write_text(json.dumps(res, indent=2))
    md = write(res, name)
    (OUT / f"{stem}.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
