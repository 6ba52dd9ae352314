"""Word- vs token-level prompt compression: does keeping words whole change DaMoC's ranking or cost?

Per domain of the bench zoo, the DaMoC spec of bench/selection.py run three ways on one embedded
cluster: compression off, `granularity: token` (subword pieces, Selective Context's cut) and
`granularity: word` (the default), each scored against the full fine-tuning reference (top-1,
Kendall tau). The reference and the word run reuse bench/cost.py's run directories when they are
there (`--work runs/bench-cost`). Prints, per domain: pick, tau, prompt tokens kept, training
tokens and FLOPs, worker-seconds, and a few prompts compressed both ways. Writes
bench/results/granularity.{md,json}. Never run by the test suite.

    .venv/bin/python -m bench.granularity --zoo zoo/bench
"""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path
from typing import Any

from bench.harness import opening
from bench.selection import costs, damoc_spec, final_scores, recipe_args, reference_spec, run
from damoc.report.agreement import best, kendall_tau, top1_hit
from damoc.rundir import read_json

VARIANTS = {"off": {"enabled": False}, "token": {"granularity": "token"}, "word": {"granularity": "word"}}


def variant_spec(base: dict[str, Any], name: str, out: Path) -> dict[str, Any]:
    if name == "word":  # the default: bench/cost.py's DaMoC run as it is
        return base
    spec = copy.deepcopy(base)
    spec["output_dir"], spec["name"] = str(out), f"{base['name']}-{name}"
    spec["data"]["compress"] = {**spec["data"]["compress"], **VARIANTS[name]}
    return spec


def figures(run_dir: Path, truth: dict[str, float]) -> dict[str, Any]:
    ranking = read_json(run_dir / "report" / "ranking.json")
    manifest = read_json(run_dir / "data" / "manifest.json")
    choice = {c["name"]: float(c["rank"]) for c in ranking["candidates"] if c["rank"] is not None}
    c = costs(run_dir)
    tokens = sum((e.get("train_tokens") or 0) for e in read_json(run_dir / "finetune" / "results.json")["candidates"])
    return {"order": sorted(choice, key=choice.get), "pick": best(choice, "min"),
            "top1": top1_hit(choice, truth, "min"), "tau": kendall_tau(choice, truth),
            "prompt_tokens": [manifest.get("tokens_before"), manifest.get("tokens_after")],
            "train_tokens": tokens, "flops": c["flops"], "worker_seconds": c["total_ws"],
            "examples": ((manifest.get("examples") or {}).get("compress") or [])[:2]}


def table(domain: str, res: dict[str, Any]) -> str:
    lines = [f"### {domain}", "", f"Full fine-tuning ranks: {' > '.join(res['truth'])}.", "",
             "| compression | ranking | top-1 | Kendall tau | prompt tokens kept | training tokens | training FLOPs | "
             "worker-s |", "|---|---|---|---|---|---|---|---|"]
    for name, f in res["variants"].items():
        before, after = f["prompt_tokens"]
        kept = f"{after / before:.0%}" if before and after is not None else "-"
        lines.append(f"| {name} | {' > '.join(f['order'])} | {'yes' if f['top1'] else 'no'} | {f['tau']:+.2f} | "
                     f"{kept} | {f['train_tokens']:,d} | {f['flops']:.3g} | {f['worker_seconds']:.0f} |")
    for name in ("token", "word"):
        for e in res["variants"].get(name, {}).get("examples", [])[:1]:
            lines += ["", f"- {name}: {json.dumps(e.get('before'), ensure_ascii=False)[:240]}",
                      f"  → {json.dumps(e.get('after'), ensure_ascii=False)[:240]}"]
    return "\n".join(lines)


def main() -> None:
    def configure(ap):
        recipe_args(ap, "runs/bench-cost")  # bench/cost.py's folder: its runs are reused
        ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))

    a = opening(__doc__, configure)

    from damoc.runtime import connect
    from damoc.zoo.build import build_zoo

    zoo, work, out = Path(a.zoo).resolve(), Path(a.work).resolve(), Path(a.out)
    rt = connect(None)
    shared = types.SimpleNamespace(address=rt.address)
    results: dict[str, Any] = {}
    try:
        names = [c["name"] for c in build_zoo(zoo, a.preset, a.seed)["candidates"]]
        info = json.loads((zoo / "zoo.json").read_text())
        for d in a.domains:
            base = damoc_spec(zoo, d, work / d / "damoc", names, a)
            truth = final_scores(run(reference_spec(base, work / d / "full", info["data"][d]["train"]), shared))
            dirs = {"word": work / d / "damoc", "token": work / d / "damoc-token", "off": work / d / "damoc-off"}
            variants = {v: figures(run(variant_spec(base, v, dirs[v]), shared), truth) for v in a.variants}
            results[d] = {"truth": sorted(truth, key=truth.get), "variants": variants}
            out.mkdir(parents=True, exist_ok=True)
            (out / "granularity.json").write_text(json.dumps(results, indent=1, default=str))
            (out / "granularity.md").write_text("\n\n".join(
                ["# Word- vs token-level prompt compression (bench/granularity.py)",
                 f"zoo `{a.zoo}`; the DaMoC spec of bench/selection.py (keep_ratio {a.keep_ratio}, compress ratio "
                 f"{a.compress_ratio}, prune {a.prune_ratio}, ASHA grace {a.grace}), compression off / token / word; "
                 "tau against full fine-tuning of every candidate on all rows.",
                 *[table(k, r) for k, r in results.items()]]) + "\n")
    finally:
        rt.shutdown()
    print((out / "granularity.md").read_text())


if __name__ == "__main__":
    main()
