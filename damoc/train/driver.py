"""The Tune driver (Ray Train V2 pattern): one trial per candidate, each a function that builds
and fits its own TorchTrainer; ASHA on the select metric; concurrency from the cluster's resources.

The driver also keeps each trial's book (start, results, end: the timeline's driver-side phases,
and the cost of every attempt) and stops the experiment once the selection is decided: ASHA has
stopped every candidate but one and that one has passed every rung the others failed, so it ranks
first whatever it does next.

Resume: the book and ASHA's rung records are the Tune callback's state, which Tune saves with the
experiment (RUN/.finetune-state/... or finetune.storage_path). `Tuner.restore` brings back every
trial as it was (finished and stopped ones stay so, running ones resume from their last checkpoint)
and the callback's state: the decisions already made stand and the cost of the lost attempt is kept.
ASHA itself is not part of Tune's experiment state, so its records travel in the callback's.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from damoc.compat import actor_node, asha_rung_records, load_asha_rung_records, tune_survives_oom_kills
from damoc.rundir import atomic_write_json, read_json
from damoc.runtime import on_head_node
from damoc.schedule import SCHEDULERS
from damoc.spec import is_uri
from damoc.train.args import TrainArgs
from damoc.train.loop import train_loop_per_worker
from damoc.train.rungs import RUNG_SCORE, RungBarrier

log = logging.getLogger("damoc.train")
DRIVER_MEMORY = 256 * 1024 * 1024
# Ray Train settings for every trial's run. Train propagates them from the process that calls fit to
# its controller and workers. The preemption watcher is observability only (a process per trial);
# a shorter poll interval brings reports, and so rung decisions, to Tune sooner.
TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
EXPERIMENT_STATE_S = "3"  # how often Tune saves the experiment (and the book): what a crash can lose
BOOKS: dict[str, Book] = {}  # this process's books by key: a restored callback brings its own
HALVINGS = "micro_batch_halvings"  # in a trial's config: its retry after running out of memory
SNAPSHOT = "damoc_book_snapshot.json"  # the book when a sweep was cut short, beside Tune's experiment state


@dataclass
class TrialPlan:
    """Everything one candidate's trial needs; `args` is the per-worker loop's configuration; `memory`
    the bytes each of its workers asks Ray for (damoc/lm/memory.py), 0 for none."""

    name: str
    args: TrainArgs
    storage_path: str
    memory: int = 0


MEMORY_SIGNS = ("OutOfMemoryError", "running low on memory", "out of memory", "MemoryError",
                "can't allocate memory", "Cannot allocate memory")


def out_of_memory(error: BaseException | str | None) -> bool:
    """Whether a trial's failure is a lack of memory: Ray's memory monitor killed its worker, or an
    allocation failed (CPU or GPU)."""
    if error is None:
        return False
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return any(sign in text for sign in MEMORY_SIGNS)


def shrunk(args: TrainArgs, halvings: int) -> TrainArgs:
    """The same effective batch in smaller micro-batches: the retry of a trial that ran out of memory."""
    factor = 2 ** halvings
    if halvings <= 0 or args.batch_size < factor:
        return args
    return replace(args, batch_size=args.batch_size // factor, grad_accum=args.grad_accum * factor,
                   eval_batch_size=max(1, args.eval_batch_size // factor))


def worker_resources(num_workers: int, use_gpu: bool, per_worker: dict[str, float] | None) -> dict[str, float]:
    """What one trial takes from the cluster (its driver takes nothing)."""
    each = dict(per_worker or ({"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1}))
    if use_gpu:
        each.setdefault("GPU", 1)
    return {k: v * num_workers for k, v in each.items()}


def run_trial(config: dict[str, Any], plans: dict[str, TrialPlan], scaling: dict[str, Any],
              max_failures: int) -> None:
    """One Tune trial: fit this candidate's TorchTrainer; rank 0's reports reach Tune. A worker group
    that runs out of memory is fitted once more here in micro-batches half as large (same effective
    batch, from its last checkpoint); a local-mode trial's process dies with it, and its retry is told
    to halve through the trial's config (`Bookkeeping.on_trial_recover`)."""
    started = time.time()
    os.environ.update(TRAIN_ENV)
    release_memory()  # a reused trial process: what the last trial left is freed before this one loads
    plan = plans[config["candidate"]]
    halvings = int(config.get(HALVINGS, 0))
    while True:
        try:
            _trainer(plan, shrunk(plan.args, halvings).started(started), scaling, max_failures).fit()
            return
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is a first lack of memory
            if plan.args.local or halvings or not out_of_memory(exc) or plan.args.batch_size < 2:
                raise
            halvings = 1


def _trainer(plan: TrialPlan, args: TrainArgs, scaling: dict[str, Any], max_failures: int):
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    local = args.local  # Ray Train's local mode: the loop runs here, in this (reused) trial process
    per_worker = worker_resources(1, scaling["use_gpu"], scaling["resources_per_worker"])
    if plan.memory and "memory" not in per_worker:
        per_worker["memory"] = plan.memory
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"args": args},
        scaling_config=ray.train.ScalingConfig(**{**scaling, "num_workers": 0}) if local
        else ray.train.ScalingConfig(**{**scaling, "resources_per_worker": per_worker}),
        # The run's name and storage stay the same across attempts: a resumed worker group continues
        # from the run's last checkpoint.
        run_config=ray.train.RunConfig(
            name=plan.name, storage_path=plan.storage_path, callbacks=[] if local else [TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )


def release_memory() -> None:
    """Free what earlier trials in this (reused) process left: Python's garbage, then the C heap's free
    pages handed back to the system (glibc keeps them otherwise, and the process looks as large as the
    largest model it ever trained)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@dataclass
class TrialRecord:
    """What the driver saw of one trial (wall clock, seconds since the epoch), over its attempts."""

    name: str
    started: float | None = None
    first_result: float | None = None
    last_result: float | None = None
    ended: float | None = None
    last_step: int = 0
    entered: float | None = None  # when this attempt's trial function started (reported by rank 0)
    status: str | None = None  # Tune's, at the end: TERMINATED | ERROR
    rungs: dict[str, float] = field(default_factory=dict)  # the metric at each rung it reported
    earlier_seconds: float = 0.0  # wall seconds of earlier attempts: lost, paused, or cut short by the driver
    attempts: int = 0
    memory_failures: int = 0  # attempts that ended for lack of memory
    node: str | None = None  # where its latest attempt reported from
    lost_on: list[str] = field(default_factory=list)  # nodes of lost attempts (some never reported from there)


@dataclass
class Book:
    """The driver's view of the sweep: per-trial records and whether the selection is decided."""

    planned_steps: int
    decide: bool  # stop the winner once decided (tune.finish_winner false); the step is noted either way
    expected: int = 0  # trials in the sweep (Tune creates them only as slots free up)
    metric: str = "eval_loss"
    rungs: list[int] = field(default_factory=list)
    key: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    t0: float = field(default_factory=time.time)
    trials: dict[str, TrialRecord] = field(default_factory=dict)
    decided_at: int | None = None
    winner: str | None = None
    resumed: int = 0  # times the sweep was restored after an interruption
    snapshot: str = ""  # where the book is written when the sweep is cut short: a local path, "" for a URI

    def record(self, name: str) -> TrialRecord:
        return self.trials.setdefault(name, TrialRecord(name))

    def check_decided(self, statuses: dict[str, str]) -> bool:
        """Decided when one trial is left and every other one was stopped early (none finished, none
        waiting to start), and the one left has reported at least as deep as the deepest stop."""
        if not self.rungs or self.decided_at is not None:
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
        if self.decide:
            log.info("finetune: decided at step %d: %s is the last candidate standing; stopping it there "
                     "(tune.finish_winner: true trains it to the end)", self.decided_at, self.winner)
        else:
            log.info("finetune: decided at step %d: %s is the last candidate standing; training it on to "
                     "step %d (tune.finish_winner)", self.decided_at, self.winner, self.planned_steps)
        return True

    def state(self) -> dict[str, Any]:
        return {"trials": {n: asdict(r) for n, r in self.trials.items()}, "t0": self.t0,
                "decided_at": self.decided_at, "winner": self.winner, "resumed": self.resumed}

    def save_snapshot(self) -> None:
        """The book as it is when the sweep is cut short (interrupted, or the driver failing): Tune saves it
        with the experiment only every EXPERIMENT_STATE_S, and the seconds since then would be lost."""
        if self.snapshot:
            with contextlib.suppress(OSError):
                atomic_write_json(Path(self.snapshot), {"at": time.time(), "book": self.state()})

    def restore(self, state: dict[str, Any]) -> None:
        """The book of an interrupted sweep: attempts that were running when it stopped are closed when it
        was cut short (its snapshot), else at their last sign of life; their seconds are kept, and the next
        attempt starts a new record."""
        snap, close_at = read_json(Path(self.snapshot)) if self.snapshot else None, None
        if isinstance(snap, dict) and snap.get("book", {}).get("t0") == state["t0"]:
            state, close_at = snap["book"], snap["at"]  # newer than what Tune saved
            Path(self.snapshot).unlink(missing_ok=True)
        self.t0, self.decided_at, self.winner = state["t0"], state["decided_at"], state["winner"]
        self.resumed = state.get("resumed", 0) + 1
        for name, r in state["trials"].items():
            rec = TrialRecord(**r)
            if rec.started is not None and rec.ended is None:  # cut short: its seconds stay on the bill
                end = close_at or rec.last_result or rec.started
                rec.earlier_seconds += max(0.0, end - (rec.entered or rec.started))
                rec.started = rec.first_result = rec.entered = None
            self.trials[name] = rec
        log.info("finetune: resuming the sweep (attempt %d): %s", self.resumed + 1,
                 ", ".join(f"{n} at step {r.last_step} ({r.status or 'to continue'})" for n, r in self.trials.items()))


class ResumableASHA(ASHAScheduler):
    """ASHA whose rung records can be saved and put back (Tune restores trials, not the scheduler), and
    which keeps a lost trial from falling behind for good.

    A trial whose process died (its node was lost) waits for a slot to restart from its checkpoint; the
    trials still running would otherwise train on past their rungs, holding the slots it needs, and be
    judged without it. So a trial that reaches a rung while a displaced trial (lost, or paused here) waits
    below that rung yields its slot: Tune pauses it there (its checkpoint is the one it just reported) and
    starts the waiting one first (Tune runs pending trials before paused ones). The cost of a lost node is
    the lost trial's steps since its checkpoint and its restart, and the ranking does not depend on it.
    Once a trial was lost the cluster may have fewer slots than the sweep started with: from then on a
    trial also yields at a rung to trials still waiting to start (the winner holding at its rung for them,
    in the only slot left, would wait for them in vain)."""

    def __init__(self, *args, rungs: list[int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.rungs = set(rungs or [])
        self.displaced: dict[str, int] = {}  # trial id -> the step it waits at for a slot
        self.shrunk = False  # a trial was lost: the slots the sweep was planned with may be gone
        self.on_yield: Any = None  # called with a trial that yields its slot (the barrier stops waiting for it)

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        step = result.get("step")
        if decision != self.CONTINUE or step not in self.rungs:
            return decision
        waiting = [t for t in tune_controller.get_trials() if t.status in ("PENDING", "PAUSED")
                   and self.displaced.get(t.trial_id, 0 if self.shrunk else step) < step]
        if not waiting:
            return decision
        self.displaced[trial.trial_id] = step
        if self.on_yield is not None:
            self.on_yield(trial)
        log.info("finetune: %s yields its slot at step %d to %s, waiting for one below that rung",
                 trial.config.get("candidate"), step, ", ".join(t.config.get("candidate", "?") for t in waiting))
        return self.PAUSE

    def records(self) -> list[dict[str, dict[str, float]]]:
        """Per bracket, per rung milestone: {trial id: recorded value}."""
        return asha_rung_records(self)

    def load_records(self, saved: list[dict[str, dict[str, float]]]) -> None:
        load_asha_rung_records(self, saved)


def asha_scheduler(book: Book, grace_period: int, reduction_factor: float) -> ResumableASHA:
    """`tune.scheduler: asha` (damoc/schedule.py): ASHA over the book's planned steps and rungs."""
    return ResumableASHA(time_attr="step", grace_period=grace_period, reduction_factor=reduction_factor,
                         max_t=book.planned_steps, rungs=book.rungs)


def fifo_scheduler(book: Book, grace_period: int, reduction_factor: float) -> FIFOScheduler:
    """`tune.scheduler: none`: every trial trains to the end."""
    return FIFOScheduler()


class Bookkeeping(tune.Callback):
    """Keeps the book (and the rung barrier) in step with what Tune has seen; its state is the book and
    ASHA's records, saved by Tune with the experiment."""

    def __init__(self, book: Book, scheduler, barrier_name: str | None):
        self.book, self.scheduler, self.barrier_name = book, scheduler, barrier_name
        BOOKS[book.key] = book
        if isinstance(scheduler, ResumableASHA):
            scheduler.on_yield = self._off_slot

    def _off_slot(self, trial, lost: bool = False) -> TrialRecord:
        """A trial that lost its slot (its process died) or yields it (paused): the attempt that ends is
        closed on the bill (every attempt is paid for), and the rung barrier stops waiting for it."""
        rec, now = self.book.record(trial.config["candidate"]), time.time()
        rec.earlier_seconds += max(0.0, now - (rec.entered or rec.started or now))
        rec.started = rec.entered = rec.first_result = None
        if self.barrier_name:
            self._barrier().leave.remote(rec.name, lost)
        return rec

    def _barrier(self):
        return ray.get_actor(self.barrier_name) if self.barrier_name else None

    def on_trial_start(self, iteration, trials, trial, **info):
        rec = self.book.record(trial.config["candidate"])
        rec.started, rec.ended, rec.status = time.time(), None, None
        rec.attempts += 1
        if isinstance(self.scheduler, ResumableASHA):
            self.scheduler.displaced.pop(trial.trial_id, None)
        if self.barrier_name:
            self._barrier().join.remote(rec.name, rec.last_step)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        rec, now = self.book.record(trial.config["candidate"]), time.time()
        rec.first_result = rec.first_result or now
        rec.last_result = now
        rec.entered = result.get("trial_started_at") or rec.entered
        rec.node = result.get("node") or rec.node
        if "step" in result:
            rec.last_step = int(result["step"])
            value = result.get(self.book.metric)
            log.info("finetune: %-16s step %4d  %s %s", rec.name, rec.last_step, self.book.metric,
                     "-" if value is None else f"{value:.4f}")
            if rec.last_step in self.book.rungs and self.book.metric in result:
                rec.rungs[str(rec.last_step)] = float(result[self.book.metric])
            if isinstance(result.get("kept_because"), str):
                log.info("finetune: %s goes on from rung %d although ASHA's cut would stop it: %s", rec.name,
                         rec.last_step, result["kept_because"])
            if self.barrier_name:
                self._barrier().processed.remote(rec.name, rec.last_step)

    def _end(self, trial, status: str):
        rec = self.book.record(trial.config["candidate"])
        rec.ended, rec.status = time.time(), status
        if self.barrier_name:
            self._barrier().leave.remote(rec.name)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, "TERMINATED")

    def on_trial_recover(self, iteration, trials, trial, **info):
        """A trial about to be retried (its process died: a lost node, a crash, lack of memory). The attempt
        that ended stays on the bill; the trial leaves the rung barrier, so the trials waiting there are
        released under ASHA's rule instead of holding their slots for one that may need a slot to come back
        (it is judged by plain ASHA when it reaches the rung). If it ran out of memory, the retry trains in
        micro-batches half as large (its config is what the new attempt starts with)."""
        reported = self.book.record(trial.config["candidate"]).first_result is not None  # this attempt
        rec, failure = self._off_slot(trial, lost=True), last_failure(trial)
        if isinstance(self.scheduler, ResumableASHA):
            self.scheduler.displaced[trial.trial_id] = rec.last_step
            self.scheduler.shrunk = True
        if out_of_memory(failure):
            rec.memory_failures += 1
            if not trial.config.get(HALVINGS):
                trial.config[HALVINGS] = 1
                log.warning("finetune: %s ran out of memory; retrying from its last checkpoint in micro-batches "
                            "half as large (same effective batch)", rec.name)
            return
        actor = re.search(r"actor(?:_id:| ID:)? ([0-9a-f]{32})", failure)  # its node, if it never reported
        since = f"step {rec.last_step} (its last checkpoint)" if rec.last_step else "the start (no checkpoint yet)"
        node = rec.node if reported else None  # else rec.node is an earlier attempt's
        node = node or (actor_node(actor.group(1)) if actor else None)
        if node and node not in rec.lost_on:
            rec.lost_on.append(node)
        node = (node or "?")[:12]
        if any(sign in failure for sign in NODE_LOSS_SIGNS):  # its process unreachable: the node is going
            log.warning("finetune: node %s lost: %s restarts from %s where there is room", node, rec.name, since)
        else:
            log.warning("finetune: %s: its trial process on node %s ended (%s); it restarts from %s", rec.name,
                        node, failure_line(failure), since)

    def on_trial_error(self, iteration, trials, trial, **info):
        if out_of_memory(last_failure(trial)):
            self.book.record(trial.config["candidate"]).memory_failures += 1
        self._end(trial, "ERROR")

    def on_step_end(self, iteration, trials, **info):
        already = self.book.decided_at is not None
        if self.book.check_decided({t.config["candidate"]: t.status for t in trials}) and not already \
                and self.barrier_name:
            self._barrier().mark_decided.remote(self.book.winner)  # the winner holding at its rung ends there

    def get_state(self) -> dict[str, Any]:
        asha = self.scheduler.records() if isinstance(self.scheduler, ResumableASHA) else None
        return {"book": self.book.state(), "asha": asha}

    def set_state(self, state: dict[str, Any]) -> None:
        self.book.restore(state["book"])
        BOOKS[self.book.key] = self.book
        if state.get("asha") and isinstance(self.scheduler, ResumableASHA):
            self.scheduler.load_records(state["asha"])


NODE_LOSS_SIGNS = ("node has died", "node was terminated", "ActorUnavailableError", "temporarily unavailable")


def failure_line(failure: str) -> str:
    """The last line of a failure's text that says something (Tune's error file ends with the cause)."""
    lines = [ln.strip() for ln in failure.splitlines() if ln.strip() and not ln.startswith(("Traceback", "  "))]
    return lines[-1][:160] if lines else "no reason given"


def last_failure(trial) -> str:
    """The text of a trial's latest failure, from the error file Tune has just appended to."""
    path = trial.error_file
    if not path or not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().rsplit("Failure # ", 1)[-1]


class Decided(tune.Stopper):
    """Ends the sweep once the book says the selection is decided."""

    def __init__(self, book: Book):
        self.book = book

    def __call__(self, trial_id, result):
        return False

    def stop_all(self):
        return self.book.decide and self.book.decided_at is not None


TRACKERS = {"tensorboard": ("tensorboardX", "tensorboardX"), "mlflow": ("mlflow", "mlflow"),
            "wandb": ("wandb", "wandb")}


def trackers(names: list[str], job: str, storage_path: str, mlflow_uri: str | None) -> list:
    """Tune's logger callbacks for the trackers the spec names; a missing package is named up front."""
    import importlib

    out = []
    for name in names:
        module, package = TRACKERS[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise RuntimeError(f"tune.callbacks: {name} needs the {package} package (pip install {package})") from None
        if name == "tensorboard":
            from ray.tune.logger import TBXLoggerCallback

            out.append(TBXLoggerCallback())
        elif name == "mlflow":
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            uri = mlflow_uri or "file://" + storage_path.rstrip("/") + "/mlruns"
            out.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=job, save_artifact=False))
        else:
            from ray.air.integrations.wandb import WandbLoggerCallback

            out.append(WandbLoggerCallback(project=job))
    return out


def tune_candidates(plans: dict[str, TrialPlan], book: Book, *, scaling: dict[str, Any], metric: str, mode: str,
                    scheduler: str, grace_period: int, reduction_factor: float, max_concurrent: int,
                    max_failures: int, storage_path: str, rung_timeout_s: float, barrier_name: str | None,
                    local: bool, restore: bool, tracking: list | None = None, stop_confidence: float = 0.0,
                    seed: int = 0) -> tuple[Any, Book]:
    """Run (or, with `restore`, resume) one trial per plan under Tune; the ResultGrid and the book."""
    barrier = start_barrier(barrier_name, book, reduction_factor, rung_timeout_s, stop_confidence, metric, mode,
                            seed) if barrier_name else None
    # A worker-group trial is only a driver (its workers have their own resources): no CPU, so trials
    # never take CPUs their workers need; a little memory because a bundle cannot be empty. A local-mode
    # trial is the worker: it holds the worker's resources, and its process (imports, process group)
    # is reused by the next trial. Train retries a worker group; Tune retries a local trial from its
    # last checkpoint.
    def local_trial(config: dict[str, Any]) -> tune.PlacementGroupFactory:
        each = worker_resources(1, scaling["use_gpu"], scaling["resources_per_worker"])
        memory = plans[config["candidate"]].memory
        return tune.PlacementGroupFactory([{"memory": memory, **each} if memory else each])

    resources = local_trial if local else {"CPU": 0, "memory": DRIVER_MEMORY}
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, plans=plans, scaling=scaling, max_failures=max_failures), resources)
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = EXPERIMENT_STATE_S
    tune_survives_oom_kills()
    path = storage_path.rstrip("/") + "/tune"
    book.snapshot = book.snapshot or (f"{path}/{SNAPSHOT}" if not is_uri(path) else "")
    if restore:
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
    else:
        chosen = SCHEDULERS[scheduler]
        module, name = chosen.tune.split(":")
        sched = getattr(importlib.import_module(module), name)(book=book, grace_period=grace_period,
                                                               reduction_factor=reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space={"candidate": tune.grid_search(list(plans))},
            # ASHA judges the trend-projected score (damoc/train/rungs.py::rung_score); curves show the metric.
            tune_config=tune.TuneConfig(metric=RUNG_SCORE if chosen.stops_early else metric, mode=mode,
                                        scheduler=sched, num_samples=1,
                                        max_concurrent_trials=max_concurrent, reuse_actors=local),
            run_config=run_config(storage_path, [Bookkeeping(book, sched, barrier_name), *(tracking or [])],
                                  Decided(book), max_failures if local else 0))
    book.t0 = book.t0 if restore else time.time()
    try:
        grid = tuner.fit()
    except BaseException:
        BOOKS.get(book.key, book).save_snapshot()
        raise
    finally:
        if barrier is not None:
            ray.kill(barrier)
    # A restored sweep's book is the one its callback brought back (same key: it was pickled with it).
    return grid, BOOKS.get(book.key, book)


def start_barrier(name: str, book: Book, reduction_factor: float, rung_timeout_s: float, stop_confidence: float,
                  metric: str, mode: str, seed: int):
    """The rung barrier actor, by name (a resumed sweep's callback finds the new one), on the head node;
    one an interrupted driver left on a cluster that outlived it is killed first."""
    try:
        ray.kill(ray.get_actor(name))
    except ValueError:
        pass
    where = on_head_node()
    log.debug("finetune: rung barrier %s on %s", name, f"the head node {where.node_id[:12]}" if where
              else "any node (no head node found)")
    return RungBarrier.options(name=name, scheduling_strategy=where).remote(
        reduction_factor, rung_timeout_s, book.expected, book.decide, stop_confidence, metric, mode, seed)


def run_config(storage_path: str, callbacks: list, stop, max_failures: int):
    """The sweep's run config: its state under storage_path, Tune retrying a trial `max_failures` times
    from its last checkpoint, two checkpoints kept per trial."""
    return tune.RunConfig(name="tune", storage_path=storage_path, callbacks=callbacks, stop=stop,
                          failure_config=tune.FailureConfig(max_failures=max_failures),
                          checkpoint_config=tune.CheckpointConfig(num_to_keep=2))


def new_barrier_name() -> str:
    return f"damoc-rungs-{uuid.uuid4().hex[:8]}"
