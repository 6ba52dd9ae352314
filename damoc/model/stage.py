"""The model stage: candidates compressed in parallel, each in a Ray actor.

On CPUs as many actors start as fit on the cluster at once (at most one per candidate), each taking
the next candidate when it finishes one, so a small cluster pays each process's start-up and imports
once rather than once per candidate; one of them is started ahead, while the data stage ends
(`prepare`), and the others only when the candidates left would outlast their start-up. With GPUs
every candidate gets its own actor at once. An actor loads its candidate, scores the layers on
calibration rows from the data stage's output, removes the least important ones, merges them into
their kept neighbours and saves an HF folder (safetensors + tokenizer) with compression.json under
RUN/models/<name>/. A candidate that fails (bad path, unsupported architecture, out of memory) is
recorded as failed with its reason; the others finish. RUN/models/models.json lists every candidate's outcome.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import ray

from damoc.model.compress import Source, compress_candidate
from damoc.lm.load import modeling_module
from damoc.pipeline import Stage, StageContext, register_stage, release
from damoc import metrics
from damoc import records
from damoc.runtime import fitting
from damoc.spec import JobSpec, ModelSpec, resolve_path
from damoc.store import WEIGHTS, cache_root, download, is_remote, upload_folder

log = logging.getLogger("damoc.model")


@ray.remote
class CandidateCompressor:
    """Compresses one candidate per call, start to finish; torch uses the CPUs Ray gave it. `modules` are
    imported when it starts, in a thread of the lowest CPU priority (nice is per thread on Linux): an
    actor started while the data stage runs takes only the cores that stage leaves idle."""

    def __init__(self, threads: int, modules: tuple[str, ...] = ()):
        import torch

        torch.set_num_threads(max(1, threads))
        if modules:
            t = threading.Thread(target=import_quietly, args=(modules,), name="damoc-imports")
            t.start()
            t.join()
        self.started = time.time()

    def ready(self) -> float:
        """Seconds from this process's start to the end of its imports."""
        import psutil

        return self.started - psutil.Process().create_time()

    def run(self, src: Source, rows: list[dict[str, str]], m: ModelSpec, out: str, seed: int, task: str,
            template: str, eval_rows: list[dict[str, str]], max_length: int) -> dict[str, Any]:
        try:
            # The compressed model's zero-shot loss is the finetune stage's step 0: not measured twice.
            if not is_remote(out):
                return compress_candidate(src, rows, m, Path(out), seed, task, template, eval_rows, max_length,
                                          score_compressed=False)
            # A run on object storage: built on this node's disk, uploaded once, from here.
            (cache_root() / "build").mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="model-", dir=cache_root() / "build") as tmp:
                r = compress_candidate(src, rows, m, Path(tmp), seed, task, template, eval_rows, max_length,
                                       score_compressed=False)
                return {**r, "files": upload_folder(Path(tmp), out)}
        finally:  # the next candidate in this actor starts with the memory this one held
            import gc

            import torch

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def import_quietly(modules: tuple[str, ...]) -> None:
    """Import what can be imported, this thread at the lowest CPU priority."""
    with contextlib.suppress(OSError):
        os.nice(19)
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - loading the candidate says what is wrong, if anything
            log.debug("models: %s not imported ahead: %s", name, exc)


def calibration_rows(train_parquet: Path, rows: int, seed: int) -> list[dict[str, str]]:
    """A seeded sample of the selected training rows; each candidate renders them with its own
    tokenizer, as training will (damoc/lm/prompts.py)."""
    table = pq.read_table(train_parquet, columns=["instruction", "input", "output"]).to_pylist()
    if not table:
        raise ValueError(f"{train_parquet} has no rows to calibrate on")
    return random.Random(seed).sample(table, min(rows, len(table)))


def failure_reason(err: BaseException) -> str:
    """The root cause of an actor's failure in one line (Ray wraps it in RayTaskError)."""
    cause = getattr(err, "cause", None) or err
    if isinstance(err, ray.exceptions.RayActorError):
        return f"actor died (out of memory or killed): {str(err).splitlines()[0]}"
    first = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {first[0] if first else ''}"


ACTOR_RETRIES = 1


def new_compressor(m: ModelSpec, imports: tuple[str, ...], num_cpus: float | None = None):
    # A killed actor (node lost, OOM) is restarted and its candidate retried once: a run writes only its
    # own folder, from scratch, so a retry is safe.
    return CandidateCompressor.options(
        num_cpus=m.num_cpus if num_cpus is None else num_cpus, num_gpus=m.num_gpus, max_restarts=ACTOR_RETRIES,
        max_task_retries=ACTOR_RETRIES).remote(max(1, int(m.num_cpus)), imports)


def worth_starting(left: int, seconds: list[float], start_up: float) -> bool:
    """Whether another actor would help with `left` candidates queued, given the seconds the ones done
    took: it takes a candidate only after its start-up, so the ones left, but one, must keep the actors
    at work longer than that."""
    return bool(seconds) and (left - 1) * sum(seconds) / len(seconds) > start_up


class Compressors:
    """The stage's actors. A candidate goes to an actor once it is ready (past its start-up), so none
    waits behind an actor still importing. With actors started ahead (Stage.prepare), the others of the
    `size` the cluster allows start only once the candidates left would keep those busy longer than a
    start-up takes (by the mean seconds so far, or by one running that long): a handful of small
    candidates are done before a new actor would be ready, and its start would slow them."""

    def __init__(self, m: ModelSpec, imports: tuple[str, ...], size: int, ahead: list[Any]):
        self.m, self.imports = m, imports
        self.pending: dict[ray.ObjectRef, tuple[str | None, Any, float]] = {}
        self.seconds: list[float] = []  # per candidate done so far
        self.start_up = 0.0  # the longest start-up an actor reported
        self.to_start = size - len(ahead)
        for actor in ahead:
            self._ready(actor)
        if not ahead:
            self.grow(len_queue=None)

    def new(self) -> None:
        self._ready(new_compressor(self.m, self.imports))

    def _ready(self, actor) -> None:
        self.pending[actor.ready.remote()] = (None, actor, time.monotonic())

    def grow(self, len_queue: int | None) -> None:
        """Start the actors still to start, now (len_queue None), or when `len_queue` candidates at the
        mean seconds so far outlast a start-up."""
        if self.to_start <= 0 or len_queue == 0:
            return
        if len_queue is not None and not worth_starting(len_queue, self.seconds, self.start_up):
            return
        n = self.to_start if len_queue is None else min(self.to_start, len_queue)
        if self.start_up:  # an actor started ahead has been working alone until now
            log.info("models: starting %d more actors: the candidates left outlast a start-up (%.1fs)", n,
                     self.start_up)
        for _ in range(n):
            self.new()
        self.to_start = 0

    def submit(self, actor, name: str, ref) -> None:
        self.pending[ref] = (name, actor, time.monotonic())

    def next(self, len_queue: int) -> tuple[str | None, Any, float, Any, BaseException | None] | None:
        """The next call to end: (candidate or None for a start-up, actor, when it began, result, error).
        None when, with candidates queued, one has run longer than a start-up takes: the actors still to
        start are started then (a big candidate shows it before it ends)."""
        timeout = None
        running = [t0 for name, _, t0 in self.pending.values() if name is not None]
        if self.to_start > 0 and len_queue and running:
            timeout = max(0.0, min(running) + self.start_up - time.monotonic())
        done, _ = ray.wait(list(self.pending), num_returns=1, timeout=timeout)
        if not done:
            self.grow(None)
            return None
        name, actor, t0 = self.pending.pop(done[0])
        try:
            r = ray.get(done[0])
        except ray.exceptions.RayError as err:
            return name, actor, t0, None, err
        if name is None:
            self.start_up = max(self.start_up, float(r))
        return name, actor, t0, r, None

    def actors(self) -> list[Any]:
        return [a for _, a, _ in self.pending.values()]

    def drain(self, queue: list, call, done) -> None:
        """Every queued candidate through the actors: `call(actor, candidate)` starts one, `done(name, result,
        error, began)` takes its outcome. An actor that cannot start fails the next candidate in its place;
        one that died twice (its process gone) is replaced while candidates are left. No actor outlives it."""
        try:
            while self.pending:
                event = self.next(len(queue))
                if event is None:
                    continue
                name, actor, t0, r, err = event
                if err is not None and name is None and not isinstance(err, ray.exceptions.RayActorError):
                    raise err
                if name is None and err is not None:  # it could not start: the next candidate fails for it
                    name = queue.pop(0).name if queue else None
                if name is not None:
                    done(name, r, err, t0)
                    if err is None:
                        self.seconds.append(time.monotonic() - t0)
                if isinstance(err, ray.exceptions.RayActorError):  # died twice: its process is gone
                    ray.kill(actor)
                    if queue:
                        self.new()
                    continue
                self.grow(len(queue))
                if not queue:
                    ray.kill(actor)
                    continue
                cand = queue.pop(0)
                self.submit(actor, cand.name, call(actor, cand))
        finally:  # a stage that fails leaves no actor behind
            release(self.actors())


@register_stage
class ModelStage(Stage):
    name = "models"
    output = "models"
    needs = ("data",)
    spec_keys = ("model", "candidates")
    version = "2"  # 2: the damage search gallops from one layer; compression.json counts its passes

    def external_inputs(self, spec: JobSpec) -> list[str]:
        return [c.path for c in spec.candidates if c.path]

    def fingerprint_extra(self, spec: JobSpec) -> dict[str, Any]:
        ft = spec.finetune  # how calibration and zero-shot rows render, and which eval rows are scored
        return {"task": spec.data.task, "template": ft.template, "eval_rows": ft.eval_max_rows,
                "max_length": ft.max_length}

    @staticmethod
    def source(ctx: StageContext, cand) -> Source:
        location = ctx.resolve(cand.path) if cand.path else cand.hf
        return Source(cand.name, location, cand.revision, cand.trust_remote_code, cand.allow_pickle_weights)

    @staticmethod
    def start_up_imports(spec: JobSpec, base_dir: str | Path) -> tuple[str, ...]:
        """What a compressor imports as it starts (3-4 s of a process's start on a CPU): transformers and
        each local candidate's architecture. It takes candidates only once they are in: an actor still
        starting never holds one that a started actor could do sooner."""
        archs = {modeling_module(resolve_path(c.path, str(base_dir))) for c in spec.candidates if c.path}
        return ("transformers", "damoc.lm.nll", *sorted(a for a in archs if a))

    def prepare(self, spec: JobSpec, base_dir: Path) -> list[Any]:
        """On CPUs, one compressor started while the data stage ends, past its start-up when this stage
        begins. It asks for no CPU, so it never holds up the data stage; this stage counts it as one of
        the actors the cluster's CPUs allow. Not on GPUs, where each candidate has an actor of its own."""
        m = spec.model
        if not m.enabled or m.num_gpus > 0:
            return []
        return [new_compressor(m, self.start_up_imports(spec, base_dir), num_cpus=0)]

    @staticmethod
    def actors(n: int, m: ModelSpec) -> int:
        """On CPUs, as many actors as the cluster holds now (each then takes several candidates). With
        GPUs, one per candidate, all asked for at once: an autoscaling GPU group (KubeRay, from zero
        pods) grows to the whole demand, and a GPU actor gives its device memory back on finishing."""
        if m.num_gpus > 0:
            return n
        return max(1, min(n, fitting(ray.cluster_resources(), {"CPU": m.num_cpus})))

    def compressed(self, ctx: StageContext, spec: JobSpec, name: str, r: dict[str, Any]) -> dict[str, Any]:
        log.info("models: %s %d -> %d layers, %.2fM -> %.2fM params, calibration loss "
                 "%.3f original / %.3f pruned / %.3f merged, %.1fs", name, r["layers_before"],
                 r["layers_after"], r["params_before"] / 1e6, r["params_after"] / 1e6,
                 r["calibration_loss"]["original"], r["calibration_loss"]["pruned"],
                 r["calibration_loss"]["merged"], r["seconds"])
        metrics.record_candidate(spec.name, name, r)
        if "files" in r:  # on the bucket already: the mirror takes its small files (config, tokenizer, record)
            files = r.pop("files")
            ctx.uploaded.update({f"{name}/{rel}": meta for rel, meta in files.items()})
            download(ctx.worker_dir(name), {k: v for k, v in files.items() if not k.endswith(WEIGHTS)}, ctx.out / name)
        # Where the folder will be once the stage's output is swapped in (ctx.out is temporary).
        return {"name": name, "status": "compressed", "path": str(ctx.input(self.output) / name),
                "seconds": r["seconds"]}

    @staticmethod
    def failed(ctx: StageContext, name: str, err: BaseException, t0: float) -> dict[str, Any]:
        reason, seconds = failure_reason(err), round(time.monotonic() - t0, 3)
        (ctx.out / name).mkdir(parents=True, exist_ok=True)
        records.write(records.Compression, ctx.out / name / "compression.json",
                      {"name": name, "status": "failed", "reason": reason, "seconds": seconds})
        log.error("models: %s failed: %s", name, reason)
        return {"name": name, "status": "failed", "reason": reason, "seconds": seconds}

    def unreachable(self, ctx: StageContext) -> dict[str, dict[str, Any]]:
        """Hub candidates neither in the local cache nor reachable, each failed with the fix."""
        from damoc.preflight import hub_warnings

        return {name: self.failed(ctx, name, RuntimeError(line), time.monotonic())
                for name, line in hub_warnings(ctx.spec).items()}

    def run(self, ctx: StageContext) -> dict[str, Any]:
        spec, m = ctx.spec, ctx.spec.model
        entries: list[dict[str, Any]] = []
        if not m.enabled:  # the finetune stage then trains the candidates as they are
            for cand in spec.candidates:
                entries.append({"name": cand.name, "status": "original", "path": self.source(ctx, cand).location})
            records.write(records.ModelsIndex, ctx.out / "models.json", {"enabled": False, "candidates": entries})
            return {"candidates": len(entries), "compressed": 0, "failed": 0}

        ctx.runtime  # noqa: B018 - start (or join) Ray
        rows = calibration_rows(ctx.input("data") / "train.parquet", m.calibration.rows, spec.seed)
        rows_ref = ray.put(rows)
        # The rows every evaluation scores (the first eval_max_rows): the zero-shot baseline on them.
        evals = pq.read_table(ctx.input("data") / "eval.parquet", columns=["instruction", "input", "output"]).to_pylist()
        evals_ref = ray.put(evals[: spec.finetune.eval_max_rows] if spec.finetune.eval_max_rows else evals)
        size = self.actors(len(spec.candidates), m)
        log.info("models: compressing %d candidates, %d at once (%d started ahead), %d calibration rows each",
                 len(spec.candidates), size, min(size, len(ctx.prepared)), len(rows))
        release(ctx.prepared[size:])
        pool = Compressors(m, self.start_up_imports(spec, ctx.base_dir), size, ctx.prepared[:size])
        results = self.unreachable(ctx)  # failed at once, not after the hub client's retries
        queue = [c for c in spec.candidates if c.name not in results]

        def call(actor, cand):
            return actor.run.remote(self.source(ctx, cand), rows_ref, m, ctx.worker_dir(cand.name), spec.seed,
                                    spec.data.task, spec.finetune.template, evals_ref, spec.finetune.max_length)

        def done(name: str, r: dict[str, Any] | None, err: BaseException | None, t0: float) -> None:
            results[name] = self.failed(ctx, name, err, t0) if err is not None else self.compressed(ctx, spec, name, r)

        pool.drain(queue, call, done)
        entries = [results[c.name] for c in spec.candidates]
        records.write(records.ModelsIndex, ctx.out / "models.json", {"enabled": True, "candidates": entries})
        n_failed = sum(e["status"] == "failed" for e in entries)
        if n_failed == len(entries):
            raise RuntimeError("every candidate failed: " + "; ".join(f"{e['name']}: {e['reason']}" for e in entries))
        return {"candidates": len(entries), "compressed": len(entries) - n_failed, "failed": n_failed}
