"""The Tune driver (Ray Train V2 pattern): one trial per candidate, each a function that builds
and fits its own TorchTrainer; ASHA on the select metric; concurrency from the cluster's resources.

The driver also keeps each trial's book (start, results, end: the timeline's driver-side phases)
and stops the experiment once the selection is decided: ASHA has stopped every candidate but one
and that one has passed every rung the others failed, so it ranks first whatever it does next.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray

from damoc.train.args import TrainArgs
from damoc.train.loop import train_loop_per_worker
from damoc.train.rungs import RungBarrier

log = logging.getLogger("damoc.train")
DRIVER_MEMORY = 256 * 1024 * 1024
# Ray Train settings for every trial's run. Train propagates them from the process that calls fit to
# its controller and workers. The preemption watcher is observability only (a process per trial);
# a shorter poll interval brings reports, and so rung decisions, to Tune sooner.
TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


@dataclass
class TrialPlan:
    """Everything one candidate's trial needs; `args` is the per-worker loop's configuration."""

    name: str
    args: TrainArgs
    storage_path: str


def worker_resources(num_workers: int, use_gpu: bool, per_worker: dict[str, float] | None) -> dict[str, float]:
    """What one trial takes from the cluster (its driver takes nothing)."""
    each = dict(per_worker or ({"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1}))
    if use_gpu:
        each.setdefault("GPU", 1)
    return {k: v * num_workers for k, v in each.items()}


def fitting_trials(cluster: dict[str, float], per_trial: dict[str, float]) -> int:
    """How many trials fit at once on the cluster's total resources."""
    fits = [math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in per_trial.items() if v > 0]
    return min(fits) if fits else 1


def run_trial(config: dict[str, Any], plans: dict[str, TrialPlan], scaling: dict[str, Any],
              max_failures: int) -> None:
    """One Tune trial: fit this candidate's TorchTrainer; rank 0's reports reach Tune."""
    started = time.time()
    os.environ.update(TRAIN_ENV)
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    plan = plans[config["candidate"]]
    local = plan.args.local  # Ray Train's local mode: the loop runs here, in this (reused) trial process
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"args": plan.args.started(started)},
        scaling_config=ray.train.ScalingConfig(**{**scaling, "num_workers": 0}) if local
        else ray.train.ScalingConfig(**scaling),
        run_config=ray.train.RunConfig(
            name=plan.name, storage_path=plan.storage_path, callbacks=[] if local else [TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    trainer.fit()


@dataclass
class TrialRecord:
    """What the driver saw of one trial (wall clock, seconds since the epoch)."""

    name: str
    started: float | None = None
    first_result: float | None = None
    last_result: float | None = None
    ended: float | None = None
    last_step: int = 0
    entered: float | None = None  # when the trial's own driver function started (reported by rank 0)


@dataclass
class Book:
    """The driver's view of the sweep: per-trial records and whether the selection is decided."""

    planned_steps: int
    decide: bool  # stop once decided (tune.finish_winner false, ASHA on)
    expected: int = 0  # trials in the sweep (Tune creates them only as slots free up)
    t0: float = field(default_factory=time.time)
    trials: dict[str, TrialRecord] = field(default_factory=dict)
    decided_at: int | None = None
    winner: str | None = None

    def record(self, name: str) -> TrialRecord:
        return self.trials.setdefault(name, TrialRecord(name))

    def check_decided(self, statuses: dict[str, str]) -> bool:
        """Decided when one trial is left and every other one was stopped early (none finished, none
        waiting to start), and the one left has reported at least as deep as the deepest stop."""
        if not self.decide or self.decided_at is not None:
            return self.decided_at is not None
        live = [n for n, s in statuses.items() if s not in ("TERMINATED", "ERROR")]
        ended = [n for n, s in statuses.items() if s == "TERMINATED"]
        if len(statuses) < self.expected or len(live) != 1 or any(
                self.record(n).last_step >= self.planned_steps for n in ended):
            return False
        stopped = [self.record(n).last_step for n in ended]
        if not stopped or self.record(live[0]).last_step < max(stopped):
            return False
        self.decided_at, self.winner = max(stopped), live[0]
        log.info("finetune: decided at step %d: %s is the last candidate standing; stopping it there "
                 "(tune.finish_winner: true trains it to the end)", self.decided_at, self.winner)
        return True


def make_callbacks(book: Book, barrier):
    """A Tune callback keeping the book (and the rung barrier) in step with what Tune has seen, and a
    stopper that ends the sweep once the book says the selection is decided."""
    from ray import tune

    class Bookkeeping(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            book.record(trial.config["candidate"]).started = time.time()
            if barrier is not None:
                barrier.join.remote(trial.config["candidate"])

        def on_trial_result(self, iteration, trials, trial, result, **info):
            rec, now = book.record(trial.config["candidate"]), time.time()
            rec.first_result = rec.first_result or now
            rec.last_result = now
            if "step" in result:
                rec.last_step = int(result["step"])
                if barrier is not None:
                    barrier.processed.remote(rec.name, rec.last_step)

        def _end(self, trial):
            book.record(trial.config["candidate"]).ended = time.time()
            if barrier is not None:
                barrier.leave.remote(trial.config["candidate"])

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._end(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._end(trial)

        def on_step_end(self, iteration, trials, **info):
            book.check_decided({t.config["candidate"]: t.status for t in trials})

    class Decided(tune.Stopper):
        def __call__(self, trial_id, result):
            return False

        def stop_all(self):
            return book.decided_at is not None

    return Bookkeeping(), Decided()


def tune_candidates(plans: dict[str, TrialPlan], book: Book, *, scaling: dict[str, Any], metric: str, mode: str,
                    scheduler: str, grace_period: int, reduction_factor: float, max_concurrent: int,
                    max_failures: int, storage_path: str, rung_timeout_s: float, barrier_name: str | None,
                    local: bool):
    """Run one trial per plan under Tune; returns the ResultGrid."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sched = (ASHAScheduler(time_attr="step", grace_period=grace_period, reduction_factor=reduction_factor,
                           max_t=book.planned_steps) if scheduler == "asha" else FIFOScheduler())
    barrier = None
    if barrier_name:
        barrier = RungBarrier.options(name=barrier_name).remote(reduction_factor, rung_timeout_s)
    bookkeeping, stopper = make_callbacks(book, barrier)
    # A worker-group trial is only a driver (its workers have their own resources): no CPU, so trials
    # never take CPUs their workers need; a little memory because a bundle cannot be empty. A local-mode
    # trial is the worker: it holds the worker's resources, and its process (imports, process group)
    # is reused by the next trial. Train retries a worker group; Tune retries a local trial from its
    # last checkpoint.
    resources = (worker_resources(1, scaling["use_gpu"], scaling["resources_per_worker"]) if local
                 else {"CPU": 0, "memory": DRIVER_MEMORY})
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, plans=plans, scaling=scaling, max_failures=max_failures), resources)
    tuner = tune.Tuner(
        trainable,
        param_space={"candidate": tune.grid_search(list(plans))},
        tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=sched, num_samples=1,
                                    max_concurrent_trials=max_concurrent, reuse_actors=local),
        run_config=tune.RunConfig(name="tune", storage_path=storage_path, callbacks=[bookkeeping], stop=stopper,
                                  failure_config=tune.FailureConfig(max_failures=max_failures if local else 0),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
    )
    book.t0 = time.time()
    try:
        return tuner.fit()
    finally:
        if barrier is not None:
            ray.kill(barrier)


def new_barrier_name() -> str:
    return f"damoc-rungs-{uuid.uuid4().hex[:8]}"
