"""`damoc compare RUN_A RUN_B`: how well A's ranking agrees with B's (typically B = the full
fine-tuning reference), and what A cost relative to B."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from damoc.report.agreement import best, kendall_tau, rel_acc, spearman, top1_hit
from damoc import records


def load_ranking(run_dir: Path) -> dict[str, Any]:
    ranking = records.read(records.Ranking, Path(run_dir))
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
        "warnings": comparability(Path(run_a), Path(run_b), a, b),
    }


def row_hashes(path: Path) -> set[str] | None:
    """A content hash per row of a run's Parquet file (its fields only: the same rows from any file format)."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path, columns=["instruction", "input", "output"]).to_pylist()
    except (OSError, KeyError, ValueError):
        return None
    return {hashlib.sha1(json.dumps([r["instruction"], r["input"], r["output"]]).encode()).hexdigest() for r in rows}


def comparability(run_a: Path, run_b: Path, a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """What makes the two runs' figures not like for like: different eval rows, candidates or training data."""
    out = []
    ea, eb = row_hashes(run_a / "data" / "eval.parquet"), row_hashes(run_b / "data" / "eval.parquet")
    if ea is None or eb is None:
        out.append("the eval rows of " + " and ".join(str(r) for r, e in ((run_a, ea), (run_b, eb)) if e is None)
                   + " cannot be read: whether both runs scored the same rows is unknown")
    elif ea != eb:
        out.append(f"the runs were evaluated on different rows ({len(ea & eb)} in common of A's {len(ea)} and "
                   f"B's {len(eb)}): their scores are not comparable, only their orders")
    names_a, names_b = ({c["name"]: c.get("source") for c in r["candidates"]} for r in (a, b))
    only = [f"{n} only in {w}" for w, mine, theirs in (("A", names_a, names_b), ("B", names_b, names_a))
            for n in sorted(set(mine) - set(theirs))]
    if only:
        out.append("the runs have different candidates: " + ", ".join(only))
    moved = sorted(n for n in set(names_a) & set(names_b) if names_a[n] and names_b[n] and names_a[n] != names_b[n])
    if moved:
        out.append("same name, different model: " + ", ".join(f"{n} ({names_a[n]} vs {names_b[n]})" for n in moved))
    ta, tb = (train_source(r) for r in (run_a, run_b))
    if ta and tb and ta != tb:
        out.append(f"the runs trained on different data: {ta} vs {tb}")
    return out


def train_source(run_dir: Path) -> str | None:
    """The training data a run read, as its spec names it (data.train), for a like-for-like check."""
    try:
        spec = records.spec_data(run_dir)
    except records.RecordError:
        return None
    train = (spec.get("data") or {}).get("train") or {}
    return train.get("hf") or train.get("path")


def format_comparison(c: dict[str, Any], name_a: str, name_b: str) -> str:
    def ratio(v):
        return "-" if v is None else f"{v:.1f}x"

    return "\n".join([
        *[f"WARNING: {w}" for w in c.get("warnings", [])],
        f"A = {name_a}\nB = {name_b}\nmetric {c['metric']}, {len(c['candidates'])} candidates in both",
        f"Kendall tau   {c['kendall_tau']:+.3f}",
        f"Spearman rho  {c['spearman']:+.3f}",
        f"top-1 hit     {'yes' if c['top1_hit'] else 'no'} (A picks {c['choice_a']}, B's best is {c['best_b']})",
        f"RelAcc        {c['rel_acc']:.3f} (A's pick under B's scores; 1 = B's best)",
        f"cost B / A    {ratio(c['cost_ratio_worker_seconds'])} in worker-seconds "
        f"({c['worker_seconds']['b']:.1f} / {c['worker_seconds']['a']:.1f}), "
        f"{ratio(c['cost_ratio_train_flops'])} in training FLOPs",
    ])
