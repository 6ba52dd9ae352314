"""The training schedule, one home for it: how many rows a step takes and how many steps a trial runs, the
row budget keep_ratio sets, where the early-stopping scheduler compares trials (rungs), how long its grace
period is, and which steps evaluate. `damoc plan`, the data stage, the finetune stage and the report all
read these, so what the plan projects is what the run does.

Schedulers are registered by name (`tune.scheduler` takes the registry's names): an entry says where its
rungs fall, how many steps each candidate trains under it (for projections), and which callable builds
Ray Tune's scheduler for the sweep (imported only there, so this module starts no Ray).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from damoc.spec import FinetuneSpec, TuneSpec


def rows_per_step(ft: FinetuneSpec) -> int:
    """Training rows one optimizer step consumes over all workers."""
    return ft.batch_size * ft.num_workers * ft.grad_accum


def planned_steps(ft: FinetuneSpec, train_rows: int | None) -> int:
    """Optimizer steps of every trial: `epochs` passes over the training rows, capped by max_steps."""
    if ft.epochs is None or train_rows is None:
        return ft.max_steps
    return max(1, min(ft.max_steps, math.ceil(ft.epochs * train_rows / rows_per_step(ft))))


def row_budget(keep_ratio: float, readable: int | None, budgeted: bool) -> int | None:
    """The rows keep_ratio keeps, of the readable ones: applied only when a selector in the chain takes a
    budget (rule filters alone keep whatever passes them)."""
    return round(keep_ratio * readable) if budgeted and readable is not None else None


def report_steps(max_steps: int, eval_every: int, rungs: tuple[int, ...] | list[int]) -> set[int]:
    """Steps that evaluate, checkpoint and report: every eval_every, every rung, and the last."""
    return set(range(eval_every, max_steps + 1, eval_every)) | {r for r in rungs if r <= max_steps} | {max_steps}


def asha_rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """The steps where ASHA compares trials (its milestones below max_t)."""
    rungs, k = [], 0
    while True:
        r = int(grace_period * reduction_factor ** k)
        if r >= max_t:
            return rungs
        rungs.append(r)
        k += 1


def asha_schedule(n: int, rungs: list[int], planned: int, reduction_factor: float, decide: bool) -> list[int]:
    """Steps each candidate trains under synchronous successive halving (best ranked first): all n reach
    the first rung, ceil(n / rf) the next, ...; once one is left it stops there unless told to finish."""
    steps, alive = [0] * n, n
    for r in rungs:
        for i in range(alive):
            steps[i] = r
        alive = max(1, math.ceil(alive / reduction_factor))
        if alive == 1 and decide:
            return steps
    for i in range(alive):
        steps[i] = planned
    return steps


def grace_for_saving(n: int, planned: int, full_cost: float, step_cost: float, saving: float, floor: int,
                     reduction_factor: float, decide: bool) -> tuple[int, float]:
    """`tune.grace_period: auto`: the longest grace period (steps) whose ASHA schedule for `n` trials costs
    at most 1/`saving` of `full_cost` (fine-tuning every candidate in full) at `step_cost` per trial-step,
    never under `floor`; with the saving it projects. A longer grace period is more evidence before the
    first cut, so this spends what the saving allows on it: more on large data, less on small."""

    def projected(g: int) -> float:
        spent = step_cost * sum(asha_schedule(n, asha_rungs(g, reduction_factor, planned), planned,
                                              reduction_factor, decide))
        return full_cost / spent if spent > 0 else math.inf

    floor = max(1, min(floor, planned))
    lo, hi = floor, max(floor, planned)  # the schedule's cost grows with g: the largest g that meets it
    if projected(lo) < saving:
        return lo, projected(lo)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if projected(mid) >= saving else (lo, mid - 1)
    return lo, projected(lo)


def resolve_grace(tn: TuneSpec, n: int, full_steps: int, damoc_steps: int, full_params: list[float],
                  damoc_params: list[float]) -> tuple[int, float | None]:
    """The grace period in steps, and for `auto` the saving it projects (rows x parameters: full
    fine-tuning trains every candidate unpruned on every row; DaMoC's trial-steps each cost the mean
    pruned candidate; token compression saves on top of it). Both `damoc plan` and the run use it."""
    if tn.grace_period != "auto":
        return tn.grace_period, None
    full = sum(full_params) * full_steps if full_params else float(n * full_steps)
    step = sum(damoc_params) / len(damoc_params) if damoc_params else 1.0
    return grace_for_saving(n, damoc_steps, full, step, tn.target_saving, tn.min_grace_period,
                            tn.reduction_factor, not tn.finish_winner)


# ---------------------------------------------------------------- schedulers by name


@dataclass(frozen=True)
class Scheduler:
    name: str
    stops_early: bool  # compares trials at rungs (the grace period applies)
    rungs: Callable[[int, float, int], list[int]]  # (grace period, reduction factor, steps) -> rung steps
    schedule: Callable[[int, list[int], int, float, bool], list[int]]  # steps per candidate, best first
    tune: str  # "module:callable" building Ray Tune's scheduler (book=, metric=, mode=, reduction_factor=)


SCHEDULERS: dict[str, Scheduler] = {}


def register_scheduler(s: Scheduler) -> Scheduler:
    if s.name in SCHEDULERS:
        raise ValueError(f"scheduler '{s.name}' is registered twice")
    SCHEDULERS[s.name] = s
    return s


register_scheduler(Scheduler("asha", True, asha_rungs, asha_schedule, "damoc.train.driver:asha_scheduler"))
register_scheduler(Scheduler("none", False, lambda grace, rf, steps: [],
                             lambda n, rungs, planned, rf, decide: [planned] * n,
                             "damoc.train.driver:fifo_scheduler"))


def scheduler(tn: TuneSpec) -> Scheduler:
    return SCHEDULERS[tn.scheduler]


def rungs_for(tn: TuneSpec, grace: int, steps: int) -> list[int]:
    """The rung steps of the spec's scheduler for a sweep of `steps` steps."""
    return scheduler(tn).rungs(grace, tn.reduction_factor, steps)
