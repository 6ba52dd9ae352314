"""The model stage: candidates compressed in parallel, each in a Ray actor.

On CPUs as many actors start as fit on the cluster at once (at most one per candidate), each taking
the next candidate when it finishes one, so a small cluster pays each process's start-up and imports
once rather than once per candidate; with GPUs every candidate gets its own actor at once. An
actor loads its candidate, scores the layers on calibration rows from the data stage's output,
removes the least important ones, merges them into their kept neighbours and saves an HF folder
(safetensors + tokenizer) with compression.json under RUN/models/<name>/. A candidate that fails
(bad path, unsupported architecture, out of memory) is recorded as failed with its reason; the
others finish. RUN/models/models.json lists every candidate's outcome.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import ray

from damoc.model.compress import Source, compress_candidate
from damoc.pipeline import Stage, StageContext, register_stage
from damoc import metrics
from damoc.rundir import atomic_write_json
from damoc.runtime import fitting
from damoc.spec import JobSpec, ModelSpec

log = logging.getLogger("damoc.model")


@ray.remote
class CandidateCompressor:
    """Compresses one candidate per call, start to finish; torch uses the CPUs Ray gave it."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))

    def run(self, src: Source, rows: list[dict[str, str]], m: ModelSpec, out: str, seed: int, task: str,
            template: str, eval_rows: list[dict[str, str]], max_length: int) -> dict[str, Any]:
        try:
            # The compressed model's zero-shot loss is the finetune stage's step 0: not measured twice.
            return compress_candidate(src, rows, m, Path(out), seed, task, template, eval_rows, max_length,
                                      score_compressed=False)
        finally:  # the next candidate in this actor starts with the memory this one held
            import gc

            import torch

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


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


@register_stage
class ModelStage(Stage):
    name = "models"
    output = "models"
    needs = ("data",)
    spec_keys = ("model", "candidates")
    version = "1"

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
    def new_actor(m: ModelSpec):
        # A killed actor (node lost, OOM) is restarted and its candidate retried once: a run writes
        # only its own folder, from scratch, so a retry is safe.
        return CandidateCompressor.options(num_cpus=m.num_cpus, num_gpus=m.num_gpus, max_restarts=ACTOR_RETRIES,
                                           max_task_retries=ACTOR_RETRIES).remote(max(1, int(m.num_cpus)))

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
        # Where the folder will be once the stage's output is swapped in (ctx.out is temporary).
        return {"name": name, "status": "compressed", "path": str(ctx.input(self.output) / name),
                "seconds": r["seconds"]}

    @staticmethod
    def failed(ctx: StageContext, name: str, err: BaseException, t0: float) -> dict[str, Any]:
        reason, seconds = failure_reason(err), round(time.monotonic() - t0, 3)
        (ctx.out / name).mkdir(parents=True, exist_ok=True)
        atomic_write_json(ctx.out / name / "compression.json",
                          {"name": name, "status": "failed", "reason": reason, "seconds": seconds})
        log.error("models: %s failed: %s", name, reason)
        return {"name": name, "status": "failed", "reason": reason, "seconds": seconds}

    def run(self, ctx: StageContext) -> dict[str, Any]:
        spec, m = ctx.spec, ctx.spec.model
        entries: list[dict[str, Any]] = []
        if not m.enabled:  # the finetune stage then trains the candidates as they are
            for cand in spec.candidates:
                entries.append({"name": cand.name, "status": "original", "path": self.source(ctx, cand).location})
            atomic_write_json(ctx.out / "models.json", {"enabled": False, "candidates": entries})
            return {"candidates": len(entries), "compressed": 0, "failed": 0}

        ctx.runtime  # noqa: B018 - start (or join) Ray
        rows = calibration_rows(ctx.input("data") / "train.parquet", m.calibration.rows, spec.seed)
        rows_ref = ray.put(rows)
        # The rows every evaluation scores (the first eval_max_rows): the zero-shot baseline on them.
        evals = pq.read_table(ctx.input("data") / "eval.parquet", columns=["instruction", "input", "output"]).to_pylist()
        evals_ref = ray.put(evals[: spec.finetune.eval_max_rows] if spec.finetune.eval_max_rows else evals)
        size = self.actors(len(spec.candidates), m)
        queue = list(spec.candidates)
        log.info("models: compressing %d candidates, %d at once, %d calibration rows each", len(queue), size,
                 len(rows))
        pending: dict[ray.ObjectRef, tuple[str, Any, float]] = {}

        def give(actor) -> None:  # the next candidate to this actor, or the actor back to the cluster
            if not queue:
                ray.kill(actor)
                return
            cand = queue.pop(0)
            ref = actor.run.remote(self.source(ctx, cand), rows_ref, m, str(ctx.out / cand.name), spec.seed,
                                   spec.data.task, spec.finetune.template, evals_ref, spec.finetune.max_length)
            pending[ref] = (cand.name, actor, time.monotonic())

        for _ in range(size):
            give(self.new_actor(m))
        results: dict[str, dict[str, Any]] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            name, actor, t0 = pending.pop(done[0])
            try:
                results[name] = self.compressed(ctx, spec, name, ray.get(done[0]))
            except ray.exceptions.RayActorError as err:  # died twice: its process is gone
                results[name] = self.failed(ctx, name, err, t0)
                ray.kill(actor)
                actor = self.new_actor(m)
            except ray.exceptions.RayTaskError as err:
                results[name] = self.failed(ctx, name, err, t0)
            give(actor)
        entries = [results[c.name] for c in spec.candidates]
        atomic_write_json(ctx.out / "models.json", {"enabled": True, "candidates": entries})
        n_failed = sum(e["status"] == "failed" for e in entries)
        if n_failed == len(entries):
            raise RuntimeError("every candidate failed: " + "; ".join(f"{e['name']}: {e['reason']}" for e in entries))
        return {"candidates": len(entries), "compressed": len(entries) - n_failed, "failed": n_failed}
