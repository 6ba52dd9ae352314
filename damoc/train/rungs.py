"""Rung synchronisation: make ASHA's decisions independent of which trial happens to be faster.

Ray Tune's ASHA decides at a rung when a trial reports there, comparing it only with the
trials that reported there before it: the first arrival is never stopped, and which trial
arrives first depends on machine speed. DaMoC's scheduling choice: all candidates run at once
when the cluster fits them, and at each rung the running trials wait for one another, then
report in an order that makes ASHA's own rule (stop if worse than the (1 - 1/rf) quantile of
earlier arrivals) keep exactly the best ceil(n / rf) of them, i.e. synchronous successive
halving. Trials that could not start yet (too few resources) meet the rung later and are
judged by plain ASHA against what was recorded. A trial never waits longer than
`tune.rung_timeout_s`; a crashed or stopped trial is taken off the barrier by the driver's
Tune callback.

A rung where only one of the group is kept may decide the selection. When the job stops once decided,
that one holds after its report there while any other trial of the sweep is still to be judged at
that rung (running below it, or not started yet for want of a free slot) and until the driver (told
by the others' ends) says decided; then its training function returns there. So the winner ends at
the deciding rung whatever the timing, instead of training on while late trials are stopped one by
one, and needs no stopping (Tune force-kills a trial that does not return, 10 s later). A late trial
kept at that rung (it beat the cutoff ASHA applies) releases the hold: the rung did not decide.
Holding never changes a decision; it only spares the winner steps that cannot change the ranking.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import ray

from damoc.paired import Rows, Trend, beaten_shares, projected


RUNG_SCORE = "rung_score"  # the figure ASHA and the barrier judge trials by (see rung_score)


def rung_score(value: float, previous: tuple[int, float] | None, step: int, planned: int, mode: str) -> float:
    """What ASHA judges a trial by: its metric, moved along its current trend to the end of its planned
    steps when that trend is an improvement (damoc/paired.py::projected). Early curves cross: a pruned
    model healing fast, or a candidate learning the domain fast, can trail at the first rung and lead by
    the end (seen on real LLMs: Gemma 3 270M trailed SmolLM2-135M by 0.11 bits/byte after 2 steps and led
    after 14). Judged on where its trend points, such a trial is kept until its curve flattens; with flat
    curves the score is the metric itself and ASHA behaves as it always did. The trend is the change per
    step since the previous evaluation."""
    if previous is None:
        return value
    return projected(value, previous[1], previous[0], step, planned, mode)


def ranked(values: dict[str, float]) -> list[str]:
    return sorted(values, key=lambda n: (-values[n], n))


def asha_keep(n: int, reduction_factor: float) -> int:
    return max(1, math.ceil(n / reduction_factor))


def release_order(values: dict[str, float], reduction_factor: float, keep: int | None = None) -> list[str]:
    """Report order for one rung (values: higher is better) under which ASHA keeps the top `keep`
    (by default ceil(n / rf)): the kept ones from worst to best (each one beats everything recorded),
    then the rest from best to worst (each one is below every value recorded before it)."""
    order = ranked(values)
    keep = asha_keep(len(order), reduction_factor) if keep is None else keep
    return list(reversed(order[:keep])) + order[keep:]


@dataclass
class Evidence:
    """What a trial brings to a rung besides its value: what it was judged by at its previous evaluation
    after training began (`previous`, higher is better), its per-row figures now, and its trend's."""

    previous: float | None = None
    rows: Rows | None = None
    trend: Trend | None = None


def stable_keep(values: dict[str, float], evidence: dict[str, Evidence], base: int, confidence: float,
                metric: str, mode: str, seed: int) -> tuple[int, dict[str, str]]:
    """How many of a rung's group to keep (the best by value), and why each one kept beyond ASHA's `base`
    was kept. A trial below the cut is stopped only when the ranking says so steadily: it was below the
    cut at its previous evaluation too, and it is outside the best `base` in at least `confidence` of
    paired resamples of the eval rows, each trial judged there as the rung judges it (where its trend
    points). Otherwise it is kept, and so is every trial ranked above it (ASHA keeps a best prefix)."""
    order = ranked(values)
    if confidence <= 0 or len(order) <= base:
        return base, {}
    seen = {n: evidence.get(n) or Evidence() for n in order}
    before = {n: e.previous for n, e in seen.items() if e.previous is not None}
    was_out = set(ranked(before)[base:]) if set(before) == set(order) else set(order)  # unknown: agrees
    rows = {n: e.rows for n, e in seen.items() if e.rows}
    shares = beaten_shares(rows, base, metric, mode, seed, trends={n: e.trend for n, e in seen.items()}) \
        if set(rows) == set(order) else {}
    keep, why = base, {}
    for i, name in enumerate(order[base:], base):
        share = shares.get(name)
        if name not in was_out:
            why[name] = "it was ahead of the cut at its previous evaluation"
        elif share is not None and share < confidence:
            why[name] = (f"behind the best {base} in {share:.0%} of paired resamples of the eval rows, "
                         f"under the {confidence:.0%} that stopping asks")
        else:
            continue
        keep = i + 1
    return keep, {n: why.get(n, "it ranks above a trial kept for that") for n in order[base:keep]}


def cut_reasons(evidence: dict[str, Evidence], order: list[str], keep: int, metric: str, mode: str,
                seed: int) -> dict[str, str]:
    """Why each trial past the first `keep` of `order` stops at a rung, in the paired terms stable_keep
    uses: the share of resamples of the eval rows in which it is outside the kept ones, each judged where
    its trend points (what the report's "how sure" quotes). Empty when some trial brought no rows."""
    rows = {n: (evidence.get(n) or Evidence()).rows for n in order}
    if keep >= len(order) or not all(rows.values()):
        return {}
    shares = beaten_shares(rows, keep, metric, mode, seed,
                           trends={n: (evidence.get(n) or Evidence()).trend for n in order})
    return {n: f"outside the best {keep} in {shares[n]:.0%} of paired resamples of the eval rows, each trial "
               "judged where its trend points" for n in order[keep:] if n in shares}


class Rungs:
    """The barrier's state and rules (a plain class: RungBarrier is its Ray actor)."""

    def __init__(self, reduction_factor: float, timeout_s: float, expected: int = 0, decide: bool = False,
                 confidence: float = 0.0, metric: str = "eval_loss", mode: str = "min", seed: int = 0):
        self.rf, self.timeout_s = reduction_factor, timeout_s
        self.confidence, self.metric, self.mode, self.seed = confidence, metric, mode, seed  # see stable_keep
        self.evidence: dict[int, dict[str, Evidence]] = {}  # rung -> {trial: what it brought}
        self.kept: dict[int, int] = {}  # rung -> how many of its group go on
        self.kept_why: dict[int, dict[str, str]] = {}  # rung -> {trial kept beyond ASHA's cut: why}
        self.cut_why: dict[int, dict[str, str]] = {}  # rung -> {trial stopped there: why, in paired terms}
        self.expected, self.decide = expected, decide  # trials in the sweep; hold the winner once decided
        self.seen: set[str] = set()
        self.winner: str | None = None  # the last one standing, set by the driver once its book says decided
        self.emptied_at: dict[int, float] = {}  # deciding rung -> when the last other one left
        self.live: dict[str, int] = {}  # running trial -> the last step it reported (a resumed one may be past a rung)
        self.arrived: dict[int, dict[str, float]] = {}  # rung -> {trial: value}
        self.arrived_at: dict[tuple[str, int], float] = {}
        self.order: dict[int, list[str]] = {}
        self.done: dict[int, set[str]] = {}  # reports Tune has processed at each rung
        self.contested: set[int] = set()  # rungs where a late arrival was kept too: no decision there
        self.shrunk = False  # a trial was lost (see leave)

    def join(self, name: str, passed: int = 0) -> None:
        self.live[name] = max(passed, self.live.get(name, 0))
        self.seen.add(name)

    def leave(self, name: str, lost: bool = False) -> None:
        """`name` no longer holds a slot: it ended, yielded its slot, or was lost (then the cluster may have
        fewer slots than the sweep began with, and nobody holds one waiting for trials to start)."""
        self.live.pop(name, None)
        self.shrunk = self.shrunk or lost

    def arrive(self, name: str, rung: int, value: float, evidence: Evidence | None = None) -> None:
        """`value`: what the trial is judged by here (higher is better); `evidence`: see stable_keep."""
        self.live.setdefault(name, 0)
        self.seen.add(name)
        self.arrived.setdefault(rung, {})[name] = value
        self.evidence.setdefault(rung, {})[name] = evidence or Evidence()
        self.arrived_at.setdefault((name, rung), time.monotonic())

    def processed(self, name: str, rung: int) -> None:
        self.done.setdefault(rung, set()).add(name)

    def turn(self, name: str, rung: int) -> bool:
        if time.monotonic() - self.arrived_at[(name, rung)] > self.timeout_s:
            return True
        here = self.arrived[rung]
        if rung not in self.order:
            expected = {n for n, passed in self.live.items() if passed < rung}
            if not expected <= set(here):
                return False  # someone still running has not reached the rung
            self.order[rung] = release_order(here, self.rf, self.cut(rung))
        order, done = self.order[rung], self.done.get(rung, set())
        if name not in order:  # arrived after the group was released: plain ASHA
            if self.kept_late(name, rung):
                self.contested.add(rung)
            return True
        before = order[: order.index(name)]
        return all(n in done or n not in self.live for n in before)

    def cut(self, rung: int) -> int:
        """How many of the group at `rung` go on (ASHA's ceil(n / rf), more while the ranking is unsteady)."""
        here, evidence = self.arrived[rung], self.evidence.get(rung, {})
        self.kept[rung], self.kept_why[rung] = stable_keep(
            here, evidence, asha_keep(len(here), self.rf), self.confidence, self.metric, self.mode, self.seed + rung)
        self.cut_why[rung] = cut_reasons(evidence, ranked(here), self.kept[rung], self.metric, self.mode,
                                         self.seed + rung)
        return self.kept[rung]

    def why_kept(self, name: str, rung: int) -> str | None:
        """Why `name` went on from `rung` although ASHA's cut alone would have stopped it (None: it did not)."""
        return self.kept_why.get(rung, {}).get(name)

    def verdict(self, name: str, rung: int) -> dict[str, str]:
        """What the trial's report at `rung` says of the cut: why it was kept beyond it, or why it fell below
        it (in the rung's group only; a late arrival is judged by plain ASHA)."""
        kept, cut = self.why_kept(name, rung), self.cut_why.get(rung, {}).get(name)
        return {"kept_because": kept} if kept else {"cut_because": cut} if cut else {}

    def kept_late(self, name: str, rung: int) -> bool:
        """ASHA's rule for a trial reporting after its rung's group: kept unless worse than the
        (1 - 1/rf) quantile of what was recorded there before it."""
        here, t = self.arrived[rung], self.arrived_at[(name, rung)]
        earlier = [v for n, v in here.items() if n != name and self.arrived_at[(n, rung)] <= t]
        return not earlier or here[name] >= np.nanpercentile(earlier, (1 - 1 / self.rf) * 100)

    def mark_decided(self, winner: str) -> None:
        self.winner = winner

    def ends(self, name: str) -> bool:
        """Whether `name` is the decided winner of a sweep that stops once decided: it returns now."""
        return self.decide and self.winner == name

    def hold(self, name: str, rung: int, grace_s: float) -> bool:
        """Whether `name`, after its report at `rung`, should keep waiting: it is the one kept by a
        group of which only one is kept, no late trial was kept there as well, the driver has not said
        decided yet, and some other trial is still running or still to start (it may yet be stopped at
        or below this rung), or the last of them left under `grace_s` ago (the driver is catching up).
        Never longer than the rung's timeout, counted from the arrival."""
        order, now = self.order.get(rung), time.monotonic()
        if not self.decide or not order or order[0] != name or self.kept.get(rung) != 1:
            return False
        if rung in self.contested or any(p > rung for n, p in self.live.items() if n != name):
            return False  # someone else is past this rung too: it does not decide
        if now - self.arrived_at[(name, rung)] > self.timeout_s:
            return False
        if self.winner is not None or self.shrunk:
            return False
        if len(self.seen) < self.expected or any(n != name for n in self.live):
            self.emptied_at.pop(rung, None)
            return True
        return now - self.emptied_at.setdefault(rung, now) < grace_s


RungBarrier = ray.remote(num_cpus=0)(Rungs)


def poll_until(ready, first_s: float = 0.01, most_s: float = 0.2) -> None:
    """Calls ready() until it is true, sleeping first_s, then half as long again each time, up to most_s:
    a wait of a report or two (most of them) ends within ~10 ms of its cause, and a long one (a trial
    minutes behind) asks the barrier five times a second, not a hundred."""
    pause = first_s
    while not ready():
        time.sleep(pause)
        pause = min(most_s, pause * 1.5)


def wait_turn(barrier_name: str, name: str, rung: int, value: float,
              evidence: Evidence | None = None) -> dict[str, str]:
    """Called by a trial's rank-0 worker before it reports at a rung (the arguments: Rungs.arrive's). Returns
    Rungs.verdict: why it goes on although ASHA's cut alone would have stopped it, or why it is below the cut."""
    barrier = ray.get_actor(barrier_name)
    ray.get(barrier.arrive.remote(name, rung, value, evidence))
    poll_until(lambda: ray.get(barrier.turn.remote(name, rung)))
    return ray.get(barrier.verdict.remote(name, rung))


def hold_if_decided(barrier_name: str, name: str, rung: int, grace_s: float = 15.0) -> bool:
    """Called by a trial's rank-0 worker after it reported at a rung: waits while this rung may be
    deciding the selection for it (at most the barrier's timeout); True when it did, and the trial
    is to end here."""
    barrier = ray.get_actor(barrier_name)
    poll_until(lambda: not ray.get(barrier.hold.remote(name, rung, grace_s)))
    return ray.get(barrier.ends.remote(name))
