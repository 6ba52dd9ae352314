"""`damoc compare RUN_A RUN_B`: how well A's ranking agrees with B's (typically B = the full
fine-tuning reference), and what A cost relative to B."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from damoc.report.agreement import best, kendall_tau, rel_acc, spearman, top1_hit
from damoc.rundir import read_json


def load_ranking(run_dir: Path) -> dict[str, Any]:
    ranking = read_json(Path(run_dir) / "report" / "ranking.json")
    if not ranking:
        raise FileNotFoundError(f"{Path(run_dir) / 'report' / 'ranking.json'} is missing: run its report stage")
    return ranking


def compare_runs(run_a: Path, run_b: Path) -> dict[str, Any]:
    """Agreement of A's ranking with B's, RelAcc of A's pick under B's scores, cost ratio B / A.

    Rank positions (not raw scores) stand for A's and B's orderings in tau and rho: a candidate
    ASHA stopped early has a score from an earlier step, but its rank says what the run decided.
    """
    a, b = load_ranking(run_a), load_ranking(run_b)
    if a["metric"] != b["metric"]:
        raise ValueError(f"the runs rank on different metrics: {a['metric']} vs {b['metric']}")
    mode = a["mode"]
    a_rank = {c["name"]: float(c["rank"]) for c in a["candidates"] if c["rank"] is not None}
    b_rank = {c["name"]: float(c["rank"]) for c in b["candidates"] if c["rank"] is not None}
    b_score = {c["name"]: c["score"] for c in b["candidates"] if c["rank"] is not None}
    common = sorted(set(a_rank) & set(b_rank))
    if len(common) < 2:
        raise ValueError(f"need at least two candidates ranked in both runs, got {common}")
    a_rank, b_rank, b_score = ({n: d[n] for n in common} for d in (a_rank, b_rank, b_score))
    choice = {n: r if mode == "min" else -r for n, r in a_rank.items()}  # A's order, in B's metric orientation
    ca, cb = a["cost"], b["cost"]
    return {
        "metric": a["metric"], "candidates": common,
        "kendall_tau": kendall_tau(a_rank, b_rank), "spearman": spearman(a_rank, b_rank),
        "top1_hit": top1_hit(choice, b_score, mode), "rel_acc": rel_acc(choice, b_score, mode),
        "choice_a": best(choice, mode), "best_b": best(b_score, mode),
        "cost_ratio_worker_seconds": cb["worker_seconds"] / ca["worker_seconds"] if ca["worker_seconds"] else None,
        "cost_ratio_train_flops": cb["train_flops"] / ca["train_flops"] if ca.get("train_flops") else None,
        "worker_seconds": {"a": ca["worker_seconds"], "b": cb["worker_seconds"]},
        "train_flops": {"a": ca.get("train_flops"), "b": cb.get("train_flops")},
    }


def format_comparison(c: dict[str, Any], name_a: str, name_b: str) -> str:
    def ratio(v):
        return "-" if v is None else f"{v:.1f}x"

    return "\n".join([
        f"A = {name_a}\nB = {name_b}\nmetric {c['metric']}, {len(c['candidates'])} candidates in both",
        f"Kendall tau   {c['kendall_tau']:+.3f}",
        f"Spearman rho  {c['spearman']:+.3f}",
        f"top-1 hit     {'yes' if c['top1_hit'] else 'no'} (A picks {c['choice_a']}, B's best is {c['best_b']})",
        f"RelAcc        {c['rel_acc']:.3f} (A's pick under B's scores; 1 = B's best)",
        f"cost B / A    {ratio(c['cost_ratio_worker_seconds'])} in worker-seconds "
        f"({c['worker_seconds']['b']:.1f} / {c['worker_seconds']['a']:.1f}), "
        f"{ratio(c['cost_ratio_train_flops'])} in training FLOPs",
    ])
