"""Paired resampling of eval rows: every candidate is scored on the same rows, so a resample draws rows once
and recomputes every candidate's figure on them (the rows' own difficulty cancels out). The report's
confidence in its pick and the rung barrier's confidence before it stops a trial both rest on this."""

from __future__ import annotations

import math

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


def beaten_shares(rows: dict[str, Rows], keep: int, metric: str, mode: str, seed: int,
                  replicates: int = 1000) -> dict[str, float]:
    """For each candidate: the share of paired resamples of the eval rows in which at least `keep` others
    do better than it (so it is outside the best `keep`). Empty when they share no rows."""
    index = common_rows(rows, metric)
    if not index or len(rows) <= keep:
        return {}
    draws = np.random.default_rng(seed).integers(0, len(index), size=(replicates, len(index)))
    sign = -1.0 if mode == "min" else 1.0  # higher is better below
    names = sorted(rows)
    values = np.stack([sign * aggregate(metric, arrays(rows[n], index, metric), draws) for n in names])
    better = (values[None, :, :] > values[:, None, :]).sum(1)  # [j, replicate]: how many beat j there
    return {n: float((better[j] >= keep).mean()) for j, n in enumerate(names)}
