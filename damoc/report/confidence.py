"""How sure is the pick? A paired bootstrap over the eval rows.

Every candidate is scored on the same eval rows, so the rows are resampled once per replicate and
every candidate's figure is recomputed on that same resample (paired: the rows' own difficulty cancels
out). The pick is compared with each other candidate at the step where that candidate was last
evaluated: a candidate ASHA stopped at step 8 is compared with the pick at step 8, where the decision
was made, not with the pick's later figure. Reported: each candidate's figure with a 95% interval,
the probability that the pick beats every other candidate on a resample, the difference to each
one with its interval, and "too close to call" with the tied set: the candidates whose difference
interval holds 0. Deterministic under the job's seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from damoc.paired import aggregate, arrays
from damoc import records

REPLICATES = 1000
LEVEL = 0.95


def load_rows(folder: Path, step: int) -> dict[int, dict[str, float]] | None:
    """A candidate's per-row figures at a step (or its latest report before it)."""
    steps = sorted(int(p.stem.split("-")[1]) for p in folder.glob("step-*.json")) if folder.is_dir() else []
    earlier = [s for s in steps if s <= step]
    if not earlier:
        return None
    data = records.load(records.EvalRows, folder / f"step-{earlier[-1]}.json") or {}
    return {int(i): r for i, r in data.get("rows", {}).items()}


def interval(samples: np.ndarray) -> list[float]:
    lo, hi = np.percentile(samples, [50 * (1 - LEVEL), 100 - 50 * (1 - LEVEL)])
    return [float(lo), float(hi)]


def bootstrap(rows: dict[str, dict[int, dict[str, float]]], pick: str, at: dict[str, dict[str, dict[int, dict]]],
              metric: str, mode: str, seed: int, replicates: int = REPLICATES) -> dict[str, Any]:
    """`rows[c]`: candidate c's per-row figures at its last step; `at[c]`: the pick's (`pick`) and c's
    (`other`) per-row figures at c's last step (`step`). Returns the figures the module describes."""
    better = (lambda d: d > 0) if mode == "min" else (lambda d: d < 0)  # d = other - pick
    index = sorted(set.intersection(*(set(r) for r in rows.values()))) if rows else []
    if not index:
        return {}
    draws = np.random.default_rng(seed).integers(0, len(index), size=(replicates, len(index)))
    own = {c: interval(aggregate(metric, arrays(r, index, metric), draws)) for c, r in rows.items()}
    vs, beats_all = {}, np.ones(replicates, dtype=bool)
    for c, pair in at.items():
        common = sorted(set(pair["pick"]) & set(pair["other"]))
        pos = np.searchsorted(common, np.array(index)[draws])  # the same resampled rows, where both have them
        ok = np.isin(np.array(index)[draws], common)
        pos = np.where(ok, pos, 0)
        d = (aggregate(metric, arrays(pair["other"], common, metric), pos)
             - aggregate(metric, arrays(pair["pick"], common, metric), pos))
        wins = better(d)
        beats_all &= wins
        lo, hi = interval(d)
        vs[c] = {"step": pair["step"], "p_pick_better": float(wins.mean()), "difference": [lo, hi],
                 "tied": bool(lo <= 0 <= hi)}
    tied = sorted(c for c, v in vs.items() if v["tied"])
    return {"pick": pick, "p_best": float(beats_all.mean()), "too_close": bool(tied), "tied": tied,
            "intervals": own, "vs": vs, "replicates": replicates, "rows": len(index), "level": LEVEL}


def confidence(run_dir: Path, ranking: dict[str, Any], seed: int) -> dict[str, Any]:
    """The bootstrap for a run: its ranking's pick against every other ranked candidate."""
    ranked = [c for c in ranking["candidates"] if c["rank"] is not None]
    if len(ranked) < 2:
        return {}
    folder = run_dir / "finetune" / "eval_rows"
    pick = ranked[0]
    rows, at = {}, {}
    for c in ranked:
        r = load_rows(folder / c["name"], c["steps"])
        if r is None:
            return {}
        rows[c["name"]] = r
        if c is not pick:
            mine = load_rows(folder / pick["name"], c["steps"])
            if mine is None:
                return {}
            at[c["name"]] = {"pick": mine, "other": r, "step": c["steps"]}
    return bootstrap(rows, pick["name"], at, ranking["metric"], ranking["mode"], seed)
