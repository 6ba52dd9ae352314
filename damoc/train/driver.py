"""The Tune driver (Ray Train V2 pattern): one trial per candidate, each a function that builds
and fits its own TorchTrainer; ASHA on the select metric; concurrency from the cluster's resources."""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass
from typing import Any

import ray

from damoc.train.loop import train_loop_per_worker
from damoc.train.rungs import RungBarrier

log = logging.getLogger("damoc.train")
DRIVER_MEMORY = 256 * 1024 * 1024
TRAIN_COLUMNS = ["instruction", "input", "output"]


@dataclass
class TrialPlan:
    """Everything one candidate's trial needs; `loop` is the per-worker loop's config."""

    name: str
    train_path: str
    loop: dict[str, Any]
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
    import pyarrow.parquet as pq
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    plan = plans[config["candidate"]]
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=plan.loop,
        scaling_config=ray.train.ScalingConfig(**scaling),
        run_config=ray.train.RunConfig(
            name=plan.name, storage_path=plan.storage_path, callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        # The compressed training set is small by design: read here and handed to Ray Data as
        # in-memory blocks, so sharding it needs no read tasks (the workers hold every CPU).
        datasets={"train": ray.data.from_arrow(pq.read_table(plan.train_path, columns=TRAIN_COLUMNS))},
    )
    trainer.fit()


def make_callback(barrier):
    """Tune callback keeping the rung barrier in step with what Tune has seen."""
    from ray import tune

    class RungBookkeeping(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            barrier.join.remote(trial.config["candidate"])

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "step" in result:
                barrier.processed.remote(trial.config["candidate"], int(result["step"]))

        def on_trial_complete(self, iteration, trials, trial, **info):
            barrier.leave.remote(trial.config["candidate"])

        def on_trial_error(self, iteration, trials, trial, **info):
            barrier.leave.remote(trial.config["candidate"])

    return RungBookkeeping()


def tune_candidates(plans: dict[str, TrialPlan], *, scaling: dict[str, Any], metric: str, mode: str,
                    scheduler: str, grace_period: int, reduction_factor: float, max_steps: int,
                    max_concurrent: int, max_failures: int, storage_path: str, rung_timeout_s: float,
                    barrier_name: str | None):
    """Run one trial per plan under Tune; returns the ResultGrid."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sched = (ASHAScheduler(time_attr="step", grace_period=grace_period, reduction_factor=reduction_factor,
                           max_t=max_steps) if scheduler == "asha" else FIFOScheduler())
    callbacks = []
    barrier = None
    if barrier_name:
        barrier = RungBarrier.options(name=barrier_name).remote(reduction_factor, rung_timeout_s)
        callbacks.append(make_callback(barrier))
    # The trial is only a driver (its workers have their own resources): no CPU, so trials never
    # take CPUs their workers need; a little memory because a bundle cannot be empty.
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, plans=plans, scaling=scaling, max_failures=max_failures),
        {"CPU": 0, "memory": DRIVER_MEMORY})
    tuner = tune.Tuner(
        trainable,
        param_space={"candidate": tune.grid_search(list(plans))},
        tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=sched, num_samples=1,
                                    max_concurrent_trials=max_concurrent, reuse_actors=False),
        run_config=tune.RunConfig(name="tune", storage_path=storage_path, callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    try:
        return tuner.fit()
    finally:
        if barrier is not None:
            ray.kill(barrier)


def new_barrier_name() -> str:
    return f"damoc-rungs-{uuid.uuid4().hex[:8]}"
