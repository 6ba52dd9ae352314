"""Paired resampling of eval rows: every candidate is scored on the same rows, so a resample draws rows once
and recomputes every candidate's figure on them (the rows' own difficulty cancels out). The report's
confidence in its pick and the rung barrier's confidence before it stops a trial both rest on this."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Rows = dict[int, dict[str, float]]  # eval row index -> that row's figures (nll and bytes, or a metric)


def aggregate(metric: str, values: dict[str, np.ndarray], draws: np.ndarray) -> np.ndarray:
    """The metric on each resample (draws: replicates x rows, indices into the arrays)."""
    if metric == "eval_loss":  # bits per byte: a ratio of sums, as the run computes it
        return values["nll"][draws].sum(1) / (math.log(2) * np.maximum(1, values["bytes"][draws].sum(1)))
    return values[metric][draws].mean(1)


def arrays(rows: Rows, index: list[int], metric: str) -> dict[str, np.ndarray]:
    keys = ("nll", "bytes") if metric == "eval_loss" else (metric,)
    return {k: np.array([rows[i][k] for i in index], dtype=np.float64) for k in keys}


def common_rows(rows: dict[str, Rows], metric: str) -> list[int]:
    """The rows every candidate has the metric's figures for."""
    keys = ("nll", "bytes") if metric == "eval_loss" else (metric,)
    sets = [{i for i, r in rs.items() if all(k in r for k in keys)} for rs in rows.values()]
    return sorted(set.intersection(*sets)) if sets else []


def projected(value, before, before_step: int, step: int, planned: int, mode: str):
    """A metric moved along its trend since the evaluation `before` (at `before_step`) to the end of the
    `planned` steps, where that trend is an improvement (a worsening one is not extrapolated: noise must
    not cut a trial). Floats, or arrays of resampled figures."""
    if before is None or step <= before_step or planned <= step:
        return value
    rate = (np.asarray(value) - np.asarray(before)) / (step - before_step)
    better = rate < 0 if mode == "min" else rate > 0
    out = np.where(better, np.asarray(value) + rate * (planned - step), value)
    return float(out) if np.ndim(out) == 0 else out


@dataclass
class Trend:
    """A candidate's figures at its previous evaluation, to resample where its trend points."""

    rows: Rows
    step: int  # of that evaluation
    now: int  # the step of the figures it is compared with
    planned: int


def beaten_shares(rows: dict[str, Rows], keep: int, metric: str, mode: str, seed: int,
                  replicates: int = 1000, trends: dict[str, Trend | None] | None = None) -> dict[str, float]:
    """For each candidate: the share of paired resamples of the eval rows in which at least `keep` others
    do better than it (so it is outside the best `keep`). With `trends`, a candidate is judged on each
    resample by where its trend points (`projected`, its previous figures resampled on the same rows), as
    the rungs judge it. Empty when they share no rows."""
    trends = {n: t for n, t in (trends or {}).items() if t is not None and n in rows}
    index = common_rows({**rows, **{f"{n} before": t.rows for n, t in trends.items()}}, metric)
    if not index or len(rows) <= keep:
        return {}
    draws = np.random.default_rng(seed).integers(0, len(index), size=(replicates, len(index)))
    sign = -1.0 if mode == "min" else 1.0  # higher is better below
    names = sorted(rows)

    def judged(n: str) -> np.ndarray:
        now = aggregate(metric, arrays(rows[n], index, metric), draws)
        t = trends.get(n)
        if t is None:
            return now
        return projected(now, aggregate(metric, arrays(t.rows, index, metric), draws), t.step, t.now, t.planned, mode)

    values = np.stack([sign * judged(n) for n in names])
    better = (values[None, :, :] > values[:, None, :]).sum(1)  # [j, replicate]: how many beat j there
    return {n: float((better[j] >= keep).mean()) for j, n in enumerate(names)}
