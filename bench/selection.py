"""Selection fidelity: does DaMoC pick what full fine-tuning would pick, and for how much less?

For each domain of a zoo (`damoc zoo build --preset bench`), on one embedded Ray cluster:
  1. a DaMoC run: hybrid data selection, token compression, layer pruning + merge, ASHA;
  2. the full fine-tuning reference: the same spec with filter.method none, compress off,
     model stage off, scheduler none (DESIGN.md), same epochs over all the rows;
  3. cheap baselines a user might pick instead, scored against the reference's final ranking:
     zero-shot eval loss of the original candidates, model size (bigger = better), and AtS
     (fine-tune on nested random subsets, fit the rectified scaling law
     L(D) = B / (D_l + D^beta) + E per candidate, extrapolate to the full set).
Prints one table per domain (top-1 hit, Kendall tau, RelAcc, cost ratio full / selector in
worker-seconds for training only and end to end, and in training FLOPs) and writes
bench/results/selection.md, selection.json and selection.png. Never run by the test suite.

    .venv/bin/python -m bench.selection --zoo zoo/bench --preset bench
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import REPO, opening
from damoc.report.agreement import best, kendall_tau, rel_acc, top1_hit
from damoc.report.compare import compare_runs, load_ranking
from damoc.rundir import read_json

log = logging.getLogger("bench.selection")

# Where each domain set lives in a zoo and how a job reads it.
DOMAINS = {
    "api_qa": {"ext": "jsonl", "task": "qa", "fields": {}},
    "general_qa": {"ext": "json", "task": "qa", "fields": {}},
    "reading_comprehension": {"ext": "parquet", "task": "reading_comprehension",
                              "fields": {"instruction": "question", "input": "context", "output": "answer"}},
    "lookup_qa": {"ext": "jsonl", "task": "qa", "fields": {}},
}


# ---------------------------------------------------------------- specs


def grace_arg(v: str) -> int | str:
    return v if v == "auto" else int(v)


def recipe_args(ap: argparse.ArgumentParser, work: str) -> None:
    """The zoo and the DaMoC recipe every bench on the bench zoo takes (this one, cost, granularity)."""
    ap.add_argument("--zoo", default="zoo/bench", help="zoo folder (built first if missing)")
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS))
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--keep-ratio", type=float, default=0.2)
    ap.add_argument("--compress-ratio", type=float, default=0.6)
    ap.add_argument("--prune-ratio", type=lambda v: v if v == "auto" else float(v), default="auto",
                    help="a fraction of the layers, or auto (the spec's default: bounded by model.max_damage)")
    ap.add_argument("--grace", type=grace_arg, default="auto",
                    help="ASHA grace period and eval interval, in steps; or auto (tune.grace_period: auto)")
    ap.add_argument("--target-saving", type=float, default=50, help="tune.target_saving, for --grace auto")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-rows", type=int, default=128)
    ap.add_argument("--work", default=work)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))


def damoc_spec(zoo: Path, domain: str, out: Path, names: list[str], a: argparse.Namespace) -> dict[str, Any]:
    d = DOMAINS[domain]
    data = zoo / "data" / domain
    return {
        "name": f"{domain}-damoc", "output_dir": str(out), "seed": a.seed,
        "data": {"train": {"path": str(data / f"train.{d['ext']}")}, "eval": {"path": str(data / f"eval.{d['ext']}")},
                 **({"fields": d["fields"]} if d["fields"] else {}), "task": d["task"],
                 "filter": {"method": "hybrid", "keep_ratio": a.keep_ratio},
                 "compress": {"enabled": True, "ratio": a.compress_ratio}},
        "candidates": [{"name": n, "path": str(zoo / "models" / n)} for n in names],
        "model": {"enabled": True, "score": "block_influence", "prune": "discrete", "prune_ratio": a.prune_ratio,
                  "merge": {"method": "sign_agree", "density": 0.2, "scale": 0.1},
                  "calibration": {"rows": 32, "max_length": 128, "batch_size": 8}},
        "finetune": {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "auto"},
                     "deepspeed": {"enabled": True, "zero_stage": 2}, "precision": "auto", "num_workers": 1,
                     "epochs": a.epochs, "max_steps": 100_000, "batch_size": 8, "lr": a.lr, "max_length": 256,
                     # auto: evaluated at the rungs it places (and the last step) only
                     "eval_every": 100_000 if a.grace == "auto" else a.grace, "eval_max_rows": a.eval_rows},
        "tune": {"scheduler": "asha", "grace_period": a.grace, "reduction_factor": 2, "sync_rungs": True,
                 **({"target_saving": a.target_saving} if a.grace == "auto" else {})},
        "select": {"metric": "eval_loss"},
    }


def reference_spec(spec: dict[str, Any], out: Path, train_rows: int) -> dict[str, Any]:
    """DESIGN.md's reference: no filter, no compression, no model stage, no early stopping. It
    evaluates about as often as the DaMoC run does (four times), not every `grace` steps."""
    ref = copy.deepcopy(spec)
    ref["name"], ref["output_dir"] = spec["name"].replace("damoc", "full"), str(out)
    ref["data"]["filter"] = {"method": "none", "keep_ratio": 1.0}
    ref["data"]["compress"] = {"enabled": False}
    ref["model"] = {"enabled": False}
    # No scheduler: the grace period is unused. Pinned so that a change of its default does not
    # make every reference run (the long part of a bench) out of date.
    ref["tune"] = {"scheduler": "none", "grace_period": 20}
    from damoc.spec import FinetuneSpec
    from damoc.schedule import planned_steps

    ft = ref["finetune"]
    ft["eval_every"] = max(1, planned_steps(FinetuneSpec(**ft), train_rows) // 4)
    return ref


# ---------------------------------------------------------------- running


def run(spec: dict[str, Any], runtime) -> Path:
    """One `damoc select --resume` in this process, on the shared cluster; the run directory."""
    from damoc.pipeline import Pipeline
    from damoc.spec import spec_from_data

    import damoc.data.stage  # noqa: F401 - register the stages
    import damoc.model.stage  # noqa: F401
    import damoc.report.stage  # noqa: F401
    import damoc.train.stage  # noqa: F401

    t0 = time.monotonic()
    js = spec_from_data(spec, source=spec["name"])
    # --resume: a run interrupted (or repeated with the same settings) redoes only what changed.
    Pipeline(js, base_dir=REPO, runtime_factory=lambda: runtime).run(resume=True)
    log.info("%s: done in %.0fs", spec["name"], time.monotonic() - t0)
    return Path(spec["output_dir"])


def final_scores(run_dir: Path) -> dict[str, float]:
    return {c["name"]: c["score"] for c in load_ranking(run_dir)["candidates"] if c["rank"] is not None}


def costs(run_dir: Path) -> dict[str, float]:
    c = load_ranking(run_dir)["cost"]
    return {"train_ws": c["stages"]["finetune"]["worker_seconds"], "total_ws": c["worker_seconds"],
            "flops": c.get("train_flops") or 0.0}


def plan_vs_report(spec: dict, run_dir: Path) -> dict:
    """`damoc plan`'s projection for the spec (before the run) beside what the run's report measured: the
    saving in CPU-hours and DaMoC's worker-seconds per stage."""
    from damoc.plan import project
    from damoc.spec import spec_from_data

    p = project(spec_from_data(spec, check_files=False), str(REPO))
    ranking = load_ranking(run_dir)
    return {"projected_saving": p["ratio_hours"], "report_saving": (ranking.get("savings") or {}).get("ratio"),
            "projected_stages": p["damoc"]["stages"], "projected_full_seconds": p["full"]["seconds"],
            "measured_stages": {k: v["worker_seconds"] for k, v in ranking["cost"]["stages"].items()},
            "report_full_seconds": ((ranking.get("savings") or {}).get("full_projected") or 0) * 3600}


def measured_saving(ref_run: Path, damoc_run: Path) -> float | None:
    """What the plan and the report project, measured: the reference's training and start-up worker-seconds
    (its evaluations left out, as both projections leave them out) over DaMoC's worker-seconds."""
    ref = read_json(ref_run / "finetune" / "results.json") or {}
    full = sum((e["timeline"]["training"] + e["timeline"]["fixed"]) * e.get("workers", 1)
               for e in ref.get("candidates", []) if e.get("timeline"))
    ours = costs(damoc_run)["total_ws"]
    return full / ours if full and ours else None


# ---------------------------------------------------------------- baselines


def zero_shot(damoc_run: Path) -> tuple[dict[str, float], float]:
    """The zero-shot ranking every DaMoC run reports (bits per byte of each original candidate on the
    eval rows, measured in the model stage), and the seconds it took there."""
    zs = load_ranking(damoc_run).get("zero_shot") or {}
    seconds = sum(((json.loads(p.read_text()).get("zero_shot") or {}).get("seconds") or 0.0)
                  for p in (damoc_run / "models").glob("*/compression.json"))
    return dict(zs.get("scores") or {}), seconds


def model_size(spec: dict[str, Any]) -> dict[str, float]:
    """Parameters from the config alone (negated: lower is better, like a loss)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = {}
    for c in spec["candidates"]:
        with torch.device("meta"):  # shapes only, no memory
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(c["path"]))
        out[c["name"]] = -float(sum(p.numel() for p in model.parameters()))
    return out


def read_records(path: Path) -> list[Any]:
    if path.suffix == ".jsonl":
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def write_records(records: list[Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(r + "\n" for r in records), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(records), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)


def rectified_fit(sizes: list[float], losses: list[float]):
    """Least-squares fit of L(D) = B / (D_l + D^beta) + E (B, E >= 0) by a grid over beta and D_l
    with B, E solved linearly; near-ties go to the smallest D_l (the plain power law)."""
    D, L = np.asarray(sizes, float), np.asarray(losses, float)
    best_fit = None
    for d_l in [0.0, *np.logspace(0, math.log10(20 * D.max()), 24)]:
        for beta in np.linspace(0.05, 2.0, 40):
            x = 1.0 / (d_l + D ** beta)
            coef, *_ = np.linalg.lstsq(np.stack([x, np.ones_like(x)], 1), L, rcond=None)
            b, e = coef
            if b < 0 or e < 0:
                continue
            sse = float(((b * x + e - L) ** 2).sum())
            if best_fit is None or sse < best_fit[0] - 1e-9:
                best_fit = (sse, b, e, beta, d_l)
    if best_fit is None:  # the loss rose with data: no law of this shape; keep the largest subset's loss
        return lambda d: float(L[np.argmax(D)])
    _, b, e, beta, d_l = best_fit
    return lambda d: float(b / (d_l + d ** beta) + e)


def ats(ref_spec: dict[str, Any], train_rows: int, work: Path, fractions: list[float], runtime,
        seed: int) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    """AtS: the reference recipe on nested random subsets, a rectified-law fit per candidate,
    the loss predicted at the full size. Returns predictions, summed costs and the points."""
    src = Path(ref_spec["data"]["train"]["path"])
    records = read_records(src)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    points: dict[str, list[tuple[int, float]]] = {}
    total = {"train_ws": 0.0, "total_ws": 0.0, "flops": 0.0}
    for f in sorted(fractions):
        n = max(8, round(f * len(records)))
        sub = work / f"subset-{n}" / f"train{src.suffix}"
        if not sub.exists():  # same seed, same subset; rewriting it would look like a new input
            write_records([records[i] for i in sorted(order[:n])], sub)
        spec = copy.deepcopy(ref_spec)
        spec["name"], spec["output_dir"] = f"{ref_spec['name']}-ats{n}", str(work / f"run-{n}")
        spec["data"]["train"] = {"path": str(sub)}
        spec["finetune"]["eval_every"] = 100_000  # the final evaluation only
        rd = run(spec, runtime)
        for k, v in costs(rd).items():
            total[k] += v
        for name, score in final_scores(rd).items():
            points.setdefault(name, []).append((n, score))
    preds = {name: rectified_fit([d for d, _ in pts], [s for _, s in pts])(train_rows) for name, pts in points.items()}
    return preds, total, points


# ---------------------------------------------------------------- tables


def agreement(choice: dict[str, float], truth: dict[str, float]) -> dict[str, Any]:
    return {"top1_hit": top1_hit(choice, truth, "min"), "kendall_tau": kendall_tau(choice, truth),
            "rel_acc": rel_acc(choice, truth, "min"), "pick": best(choice, "min")}


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def domain_table(domain: str, res: dict[str, Any]) -> str:
    ref = res["reference"]
    lines = [f"### {domain}", "",
             f"Reference (full fine-tuning) ranking: {' > '.join(res['truth_order'])}; "
             f"cost {ref['train_ws']:.0f} worker-s training, {ref['total_ws']:.0f} end to end, "
             f"{ref['flops']:.3g} training FLOPs.", "",
             "| selector | pick | top-1 hit | Kendall tau | RelAcc | full/selector training (worker-s) "
             "| full/selector end to end (worker-s) | full/selector training FLOPs |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in res["selectors"].items():
        def fmt(v):
            return "-" if v is None else ("inf" if v == math.inf else f"{v:.1f}x")
        lines.append(f"| {name} | {row['pick']} | {'yes' if row['top1_hit'] else 'no'} | {row['kendall_tau']:+.2f} "
                     f"| {row['rel_acc']:.2f} | {fmt(row.get('ratio_train'))} | {fmt(row.get('ratio_total'))} "
                     f"| {fmt(row.get('ratio_flops'))} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(results)
    selectors = list(next(iter(results.values()))["selectors"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(selectors)
    for i, s in enumerate(selectors):
        xs = np.arange(len(domains)) + i * width
        ax1.bar(xs, [results[d]["selectors"][s]["kendall_tau"] for d in domains], width, label=s)
        ax2.bar(xs, [results[d]["selectors"][s].get("ratio_total") or 0 for d in domains], width, label=s)
    for ax, title in ((ax1, "Kendall tau vs full fine-tuning"), (ax2, "cost saved, end to end (full / selector)")):
        ax.set_xticks(np.arange(len(domains)) + 0.4 - width / 2, domains, fontsize=8)
        ax.set_title(title, fontsize=10)
    ax1.axhline(0.8, color="grey", ls="--", lw=1)
    ax2.axhline(20, color="grey", ls="--", lw=1)
    ax2.set_yscale("log")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- main


def bench_domain(domain: str, zoo: Path, names: list[str], work: Path, runtime, a) -> dict[str, Any]:
    info = json.loads((zoo / "zoo.json").read_text())
    train_rows = info["data"][domain]["train"]
    spec = damoc_spec(zoo, domain, work / domain / "damoc", names, a)
    ref_spec = reference_spec(spec, work / domain / "full", train_rows)
    damoc_run, ref_run = run(spec, runtime), run(ref_spec, runtime)
    truth, ref = final_scores(ref_run), costs(ref_run)
    cmp = compare_runs(damoc_run, ref_run)
    dc = costs(damoc_run)
    selectors = {"DaMoC": {"pick": cmp["choice_a"], "top1_hit": cmp["top1_hit"], "kendall_tau": cmp["kendall_tau"],
                           "rel_acc": cmp["rel_acc"], "ratio_train": ratio(ref["train_ws"], dc["train_ws"]),
                           "ratio_total": ratio(ref["total_ws"], dc["total_ws"]),
                           "ratio_flops": ratio(ref["flops"], dc["flops"])}}
    zs, zs_seconds = zero_shot(damoc_run)
    selectors["zero-shot loss"] = {**agreement(zs, truth), "ratio_total": ratio(ref["total_ws"], zs_seconds),
                                   "ratio_flops": math.inf}
    selectors["model size"] = {**agreement(model_size(spec), truth), "ratio_total": math.inf, "ratio_flops": math.inf}
    preds, ats_cost, points = ats(ref_spec, train_rows, work / domain / "ats", a.ats_fractions, runtime, a.seed)
    selectors["AtS"] = {**agreement(preds, truth), "ratio_train": ratio(ref["train_ws"], ats_cost["train_ws"]),
                        "ratio_total": ratio(ref["total_ws"], ats_cost["total_ws"]),
                        "ratio_flops": ratio(ref["flops"], ats_cost["flops"])}
    return {"truth": truth, "truth_order": sorted(truth, key=truth.get), "reference": ref, "damoc": dc,
            "zero_shot": zs, "ats": {"predicted": preds, "points": points, "cost": ats_cost},
            "selectors": selectors}


def main() -> None:
    def configure(ap):
        recipe_args(ap, "runs/bench-selection")
        ap.add_argument("--ats-fractions", type=float, nargs="+", default=[1 / 32, 1 / 16, 1 / 8])

    a = opening(__doc__, configure)

    from damoc.runtime import connect
    from damoc.zoo.build import build_zoo

    zoo, work, out = Path(a.zoo).resolve(), Path(a.work).resolve(), Path(a.out)
    rt = connect(None)
    shared = types.SimpleNamespace(address=rt.address)  # no shutdown(): every run shares this cluster
    results: dict[str, Any] = {}
    try:
        names = [c["name"] for c in build_zoo(zoo, a.preset, a.seed)["candidates"]]
        for d in a.domains:  # results are written after each domain: a long sweep shows what it has
            results[d] = bench_domain(d, zoo, names, work, shared, a)
            text = write_results(results, out, names, a)
    finally:
        rt.shutdown()
    print(text)


def write_results(results: dict[str, Any], out: Path, names: list[str], a: argparse.Namespace) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "selection.json").write_text(json.dumps(results, indent=1, default=str))
    plot(results, out / "selection.png")
    settings = (f"zoo `{a.zoo}` (preset {a.preset}, seed {a.seed}, candidates {', '.join(names)}); "
                f"{a.epochs:g} epochs, keep_ratio {a.keep_ratio}, compress {a.compress_ratio}, prune {a.prune_ratio}, "
                f"ASHA grace {a.grace} rf 2, LoRA r 8, 1 worker per trial; AtS subsets "
                f"{', '.join(f'{f:.3g}' for f in a.ats_fractions)} of the rows")
    text = "\n\n".join(["# Selection fidelity (bench/selection.py)", settings,
                        *[domain_table(d, r) for d, r in results.items()], "![selection](selection.png)"])
    (out / "selection.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
