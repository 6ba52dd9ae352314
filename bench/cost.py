"""What DaMoC costs against fine-tuning every candidate in full, in seconds and FLOPs, on one machine.

Per domain of a zoo (`damoc zoo build --preset bench`), three ways to the same answer:
  1. plain full fine-tuning: for each candidate, a single-process torch loop on all the training
     rows, the same method (LoRA), epochs, batch, schedule and prompt as the job, every core, no
     framework, then one evaluation: the floor a user would compare against;
  2. full fine-tuning through DaMoC's own finetune stage (the reference spec of DESIGN.md);
  3. DaMoC (data selection and compression, pruning and merging, ASHA, stopped once decided).
The plain loops run before the Ray cluster starts (its background would slow them); both DaMoC
runs share one embedded cluster, whose start-up is reported apart. One table per domain: wall
seconds, worker-seconds, training FLOPs, top-1 and Kendall tau against the full reference, the
ratios plain / DaMoC, and where DaMoC's seconds went (per stage, per trial). Written to
bench/results/cost.{md,json}. Never run by the test suite.

    .venv/bin/python -m bench.cost --zoo zoo/bench --preset bench
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import types
from pathlib import Path
from typing import Any

from bench.harness import opening, plain_cached
from bench.selection import (costs, damoc_spec, final_scores, measured_saving, plan_vs_report, recipe_args,
                             reference_spec, run)
from damoc.report.agreement import best, kendall_tau, top1_hit
from damoc.rundir import read_json

log = logging.getLogger("bench.cost")


def run_timed(spec: dict[str, Any], runtime) -> tuple[Path, float]:
    """The run and its wall seconds; a run resumed from earlier output (a variant reusing the reference)
    counts the seconds its stages' records say they took, not the seconds to find them current."""
    t0 = time.monotonic()
    rd = run(spec, runtime)
    recorded = sum((read_json(rd / s / "_stage.json") or {}).get("seconds") or 0.0
                   for s in ("data", "models", "finetune", "report"))
    return rd, max(time.monotonic() - t0, recorded)


def breakdown(run_dir: Path) -> dict[str, Any]:
    """Where a run's seconds went: each stage's wall seconds, each trial's timeline."""
    stages = {s: (read_json(run_dir / s / "_stage.json") or {}).get("seconds") for s in ("data", "models", "finetune", "report")}
    results = read_json(run_dir / "finetune" / "results.json") or {}
    trials = {e["name"]: {k: e.get("timeline", {}).get(k) for k in ("fixed", "training", "evaluation", "checkpointing",
                                                                    "rung_wait", "total")}
              | {"steps": e.get("steps"), "status": e.get("status")} for e in results.get("candidates", [])}
    return {"stages": stages, "trials": trials, "decided_at": results.get("decided_at"), "rungs": results.get("rungs"),
            "grace_auto": results.get("grace_auto"),
            "kept": {e["name"]: e["kept_because"] for e in results.get("candidates", []) if e.get("kept_because")}}


def bench_domain(domain: str, zoo: Path, names: list[str], work: Path, a, plain: dict, runtime) -> dict[str, Any]:
    info = json.loads((zoo / "zoo.json").read_text())
    spec = damoc_spec(zoo, domain, work / domain / "damoc", names, a)
    ref_spec = reference_spec(spec, work / domain / "full", info["data"][domain]["train"])
    ref_run, ref_wall = run_timed(ref_spec, runtime)
    damoc_run, damoc_wall = run_timed(spec, runtime)
    truth = final_scores(ref_run)
    ranking = read_json(damoc_run / "report" / "ranking.json")
    choice = {c["name"]: float(c["rank"]) for c in ranking["candidates"] if c["rank"] is not None}
    plain_scores = {n: v["eval_loss"] for n, v in plain["candidates"].items()}
    rc, dc = costs(ref_run), costs(damoc_run)
    rows = {
        "plain full fine-tuning": {"wall": plain["seconds"], "worker_seconds": plain["seconds"], "flops": plain["flops"],
                                   "pick": best(plain_scores, "min"), "top1": top1_hit(plain_scores, truth, "min"),
                                   "tau": kendall_tau(plain_scores, truth)},
        "full fine-tuning (DaMoC's stage)": {"wall": ref_wall, "worker_seconds": rc["total_ws"], "flops": rc["flops"],
                                             "pick": best(truth, "min"), "top1": True, "tau": 1.0},
        "DaMoC": {"wall": damoc_wall, "worker_seconds": dc["total_ws"], "flops": dc["flops"],
                  "pick": best(choice, "min"), "top1": top1_hit(choice, truth, "min"),
                  "tau": kendall_tau(choice, truth)},
    }
    for r in rows.values():
        r["ratio_wall"] = plain["seconds"] / r["wall"] if r["wall"] else None
        r["ratio_flops"] = plain["flops"] / r["flops"] if r["flops"] else None
    return {"truth_order": sorted(truth, key=truth.get), "plain": plain, "rows": rows,
            "damoc_breakdown": breakdown(damoc_run), "reference_breakdown": breakdown(ref_run),
            "plan": {**plan_vs_report(spec, damoc_run), "measured_saving": measured_saving(ref_run, damoc_run)},
            "train_rows": info["data"][domain]["train"]}


def plan_line(p: dict[str, Any] | None) -> list[str]:
    """`damoc plan`'s projected saving before the run beside the report's projection and the measured one."""
    if not p or not p.get("projected_saving") or not p.get("report_saving"):
        return []

    def apart(a, b):
        return max(a, b) / min(a, b)

    truth = p.get("measured_saving")
    return [f"Saving in CPU-hours: `damoc plan` projected {p['projected_saving']:.2f}x before the run, the "
            f"report projected {p['report_saving']:.2f}x ({apart(p['projected_saving'], p['report_saving']):.2f}x "
            "apart)" + (f"; measured against the reference's training and start-up: {truth:.2f}x (plan "
                        f"{apart(p['projected_saving'], truth):.2f}x, report {apart(p['report_saving'], truth):.2f}x "
                        "from it)." if truth else "."), ""]


def domain_table(domain: str, res: dict[str, Any], cluster_start: float) -> str:
    def x(v):
        return "-" if v is None else ("inf" if v == math.inf else f"{v:.1f}x")

    lines = [f"### {domain} ({res['train_rows']:,d} training rows)", "",
             f"Full fine-tuning ranks: {' > '.join(res['truth_order'])}. Plain loops measured at "
             f"{res['plain'].get('measured_at', '-')}.", "",
             "| run | wall s | worker-s | training FLOPs | pick | top-1 | Kendall tau | plain / run, wall | "
             "plain / run, FLOPs |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["rows"].items():
        lines.append(f"| {name} | {r['wall']:.0f} | {r['worker_seconds']:.0f} | {r['flops']:.3g} | {r['pick']} | "
                     f"{'yes' if r['top1'] else 'no'} | {r['tau']:+.2f} | {x(r['ratio_wall'])} | {x(r['ratio_flops'])} |")
    b = res["damoc_breakdown"]
    lines += ["", f"DaMoC's seconds (the cluster's start-up, {cluster_start:.0f} s, is shared and not counted): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in b["stages"].items() if v is not None)
                  + (f"; rungs at steps {b['rungs']}" if b.get("rungs") else "")
                  + (f" (grace period auto: {b['grace_auto']['grace_period']} steps, "
                     f"{b['grace_auto']['projected_saving']:.1f}x projected in rows x parameters)"
                     if b.get("grace_auto") else "")
                  + (f"; decided at step {b['decided_at']}" if b["decided_at"] else "")
                  + "".join(f"; {n} went on past ASHA's cut at step {s} ({why})"
                            for n, k in (b.get("kept") or {}).items() for s, why in k.items()), "",
              *plan_line(res.get("plan")),
              "| trial | status | steps | fixed s | training s | evaluation s | checkpointing s | idle at rungs s | total s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, t in b["trials"].items():
        lines.append(f"| {name} | {t['status']} | {t['steps']} | " + " | ".join(
            "-" if t[k] is None else f"{t[k]:.1f}" for k in ("fixed", "training", "evaluation", "checkpointing",
                                                              "rung_wait", "total")) + " |")
    return "\n".join(lines)


def main() -> None:
    a = opening(__doc__, lambda ap: recipe_args(ap, "runs/bench-cost"))

    from damoc.runtime import connect
    from damoc.zoo.build import build_zoo

    zoo, work, out = Path(a.zoo).resolve(), Path(a.work).resolve(), Path(a.out)
    with connect(None):  # the zoo pretrains on Ray; the plain loops then run with the cluster gone
        names = [c["name"] for c in build_zoo(zoo, a.preset, a.seed)["candidates"]]
    threads = os.cpu_count() or 1
    plains = {d: plain_cached(damoc_spec(zoo, d, work / d / "plain", names, a), threads, work / d / "plain")
              for d in a.domains}
    t0 = time.monotonic()
    rt = connect(None)
    cluster_start = time.monotonic() - t0
    shared = types.SimpleNamespace(address=rt.address)  # every run joins this cluster
    results: dict[str, Any] = {}
    try:
        for d in a.domains:
            results[d] = bench_domain(d, zoo, names, work, a, plains[d], shared)
            write_results(results, out, a, cluster_start)
    finally:
        rt.shutdown()
    print((out / "cost.md").read_text())


def write_results(results: dict[str, Any], out: Path, a, cluster_start: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost.json").write_text(json.dumps({"cluster_start_seconds": cluster_start, "domains": results},
                                              indent=1, default=str))
    settings = (f"zoo `{a.zoo}` (preset {a.preset}, seed {a.seed}); {a.epochs:g} epochs, keep_ratio {a.keep_ratio}, "
                f"compress {a.compress_ratio}, prune {a.prune_ratio}, ASHA grace {a.grace}"
                f"{f' (target saving {a.target_saving:g}x)' if a.grace == 'auto' else ''} rf 2 (stopped once decided), "
                f"LoRA r 8, 1 worker per trial; {os.cpu_count()} cores, no GPU. Targets: plain / DaMoC >= 3x in wall "
                "time and >= 50x in training FLOPs.")
    (out / "cost.md").write_text("\n\n".join(["# Cost (bench/cost.py)", settings,
                                              *[domain_table(d, r, cluster_start) for d, r in results.items()]]) + "\n")


if __name__ == "__main__":
    main()
