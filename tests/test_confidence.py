"""The paired bootstrap behind the pick's confidence, on hand-made per-row figures (fixed seed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from damoc.report.confidence import bootstrap


def rows(nll: list[float], nbytes: list[int] | None = None) -> dict[int, dict[str, float]]:
    return {i: {"nll": v, "bytes": (nbytes or [1] * len(nll))[i]} for i, v in enumerate(nll)}


def test_a_clear_lead_is_certain_and_not_too_close():
    a, b = rows([1, 1, 1, 1]), rows([2, 2, 2, 2])
    out = bootstrap({"a": a, "b": b}, "a", {"b": {"pick": a, "other": b, "step": 8}}, "eval_loss", "min", seed=0)
    assert out["p_best"] == 1.0 and out["too_close"] is False and out["tied"] == []
    assert out["intervals"]["a"] == pytest.approx([1 / math.log(2)] * 2)  # bits per byte: nats / ln 2 / bytes
    assert out["vs"]["b"] == {"step": 8, "p_pick_better": 1.0, "difference": pytest.approx([1 / math.log(2)] * 2),
                              "tied": False}
    assert out["rows"] == 4 and out["replicates"] == 1000 and out["level"] == 0.95


def test_a_lead_that_resampling_reverses_is_too_close_and_the_figures_are_exact():
    a, b = rows([1, 2, 1, 2]), rows([2, 1, 2, 1.5])
    out = bootstrap({"a": a, "b": b}, "a", {"b": {"pick": a, "other": b, "step": 4}}, "eval_loss", "min", seed=7)
    draws = np.random.default_rng(7).integers(0, 4, size=(1000, 4))  # the same resamples, computed here
    d = (np.array([2, 1, 2, 1.5])[draws].sum(1) - np.array([1, 2, 1, 2])[draws].sum(1)) / (4 * math.log(2))
    assert out["p_best"] == out["vs"]["b"]["p_pick_better"] == float((d > 0).mean())
    assert out["vs"]["b"]["difference"] == pytest.approx(list(np.percentile(d, [2.5, 97.5])))
    assert out["too_close"] is True and out["tied"] == ["b"]
    again = bootstrap({"a": a, "b": b}, "a", {"b": {"pick": a, "other": b, "step": 4}}, "eval_loss", "min", seed=7)
    assert again == out  # deterministic under the seed


def test_higher_is_better_metrics_and_the_pick_at_the_other_ones_step():
    """accuracy (mode max): the pick at the stopped candidate's step is what it is compared with."""
    acc = lambda v: {i: {"accuracy": x} for i, x in enumerate(v)}  # noqa: E731
    pick_late, pick_at_4, other = acc([1, 1, 1, 1]), acc([0, 0, 0, 0]), acc([1, 1, 1, 0])
    out = bootstrap({"a": pick_late, "b": other}, "a", {"b": {"pick": pick_at_4, "other": other, "step": 4}},
                    "accuracy", "max", seed=0)
    assert out["vs"]["b"]["p_pick_better"] == 0.0 and out["p_best"] == 0.0  # at step 4 the pick was behind


def test_beaten_shares_count_the_resamples_in_which_enough_others_do_better():
    """Three candidates on the same 4 rows: c is behind both in every row (out of the best 2 on every
    resample), a ahead of both; b's share against keep=1 is computed here from the same draws."""
    from damoc.paired import beaten_shares

    a, b, c = rows([1, 2, 1, 2]), rows([2, 1, 2, 1.5]), rows([3, 3, 3, 3])
    out = beaten_shares({"a": a, "b": b, "c": c}, keep=2, metric="eval_loss", mode="min", seed=3)
    assert out == {"a": 0.0, "b": 0.0, "c": 1.0}
    one = beaten_shares({"a": a, "b": b, "c": c}, keep=1, metric="eval_loss", mode="min", seed=3)
    draws = np.random.default_rng(3).integers(0, 4, size=(1000, 4))
    a_sum, b_sum = np.array([1, 2, 1, 2])[draws].sum(1), np.array([2, 1, 2, 1.5])[draws].sum(1)
    assert one["b"] == float((a_sum < b_sum).mean()) and one["a"] == float((b_sum < a_sum).mean())
    assert one["c"] == 1.0
    acc = beaten_shares({"x": {0: {"accuracy": 1}, 1: {"accuracy": 1}}, "y": {0: {"accuracy": 0}, 1: {"accuracy": 0}}},
                        keep=1, metric="accuracy", mode="max", seed=0)
    assert acc == {"x": 0.0, "y": 1.0}  # higher is better
    assert beaten_shares({"x": {0: {"nll": 1, "bytes": 1}}, "y": {1: {"nll": 1, "bytes": 1}}}, 1, "eval_loss",
                         "min", 0) == {}  # no row in common: no evidence
