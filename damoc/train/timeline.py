"""Where a trial's seconds go: one timeline per trial, measured, kept in results.json and the report.

The rank-0 worker times its own phases and reports them cumulatively with every result (`t_<phase>`
metrics); the driver adds what only it sees (waiting for resources, the trial actor's start, the
teardown after the last result). Fixed phases are paid once per trial whatever its length; the others
grow with the steps it trains and the reports it makes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

DRIVER_PHASES = ("waiting_for_resources", "trial_start", "teardown")
WORKER_PHASES = ("worker_group_start", "imports", "model_load", "engine_init", "data_ready", "training",
                 "evaluation", "checkpointing", "rung_wait")
PHASES = ("waiting_for_resources", "trial_start", *WORKER_PHASES, "teardown")
FIXED = ("trial_start", "worker_group_start", "imports", "model_load", "engine_init", "data_ready", "teardown")
PREFIX = "t_"


class Timeline:
    """Seconds per worker phase, accumulated (a restarted worker group carries them in its checkpoint)."""

    def __init__(self, seconds: dict[str, float] | None = None):
        self.seconds = {p: 0.0 for p in WORKER_PHASES}
        self.seconds.update(seconds or {})

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += max(0.0, seconds)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def metrics(self) -> dict[str, float]:
        return {PREFIX + k: round(v, 3) for k, v in self.seconds.items()}


def from_metrics(result: dict) -> dict[str, float]:
    """The worker phases of a reported result."""
    return {p: float(result[PREFIX + p]) for p in WORKER_PHASES if PREFIX + p in result}


def summarise(phases: dict[str, float]) -> dict[str, float]:
    """A trial's timeline in PHASES order with its fixed cost and wall total."""
    out = {p: round(float(phases.get(p, 0.0)), 3) for p in PHASES}
    out["fixed"] = round(sum(out[p] for p in FIXED), 3)
    out["total"] = round(sum(out[p] for p in PHASES if p != "waiting_for_resources"), 3)
    return out
