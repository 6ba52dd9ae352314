"""The finetune stage: every candidate the model stage produced is fine-tuned on the data stage's
training rows, concurrently, under Ray Tune; ASHA stops weak ones early.

Writes RUN/finetune/results.json: per candidate its status (finished | decided | stopped_early |
failed with the reason), steps, learning curve (every report), tokens, FLOPs, worker-seconds and
the trial's timeline (damoc/train/timeline.py). `decided`: the last candidate standing once ASHA
had stopped all the others, stopped at that rung unless `tune.finish_winner`. The
Tune and Train storage (checkpoints, per-trial logs) lives under RUN/finetune/ too, or under
`finetune.storage_path` on a multi-node cluster.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import ray

from damoc import metrics
from damoc.pipeline import Stage, StageContext, register_stage
from damoc.rundir import atomic_write_json, read_json
from damoc.spec import JobSpec
from damoc.train import timeline
from damoc.train.args import train_args
from damoc.train.driver import Book, TrialPlan, fitting_trials, new_barrier_name, tune_candidates, worker_resources
from damoc.train.rungs import asha_rungs

log = logging.getLogger("damoc.train")

CURVE_KEYS = ("step", "eval_loss", "eval_loss_token", "exact_match", "rouge_l", "accuracy", "train_loss",
              "lr", "train_tokens", "train_seconds", "epoch", "restarts")


def planned_steps(ft, train_rows: int) -> int:
    """Optimizer steps of every trial: `epochs` passes over the training rows, capped by max_steps."""
    if ft.epochs is None:
        return ft.max_steps
    per_step = ft.batch_size * ft.num_workers * ft.grad_accum
    return max(1, min(ft.max_steps, math.ceil(ft.epochs * train_rows / per_step)))


def trainable_candidates(ctx: StageContext) -> tuple[dict[str, dict], list[dict]]:
    """Candidates the model stage left usable ({name: entry}) and those it failed."""
    index = read_json(ctx.input("models") / "models.json")
    if not index:
        raise FileNotFoundError(f"{ctx.input('models') / 'models.json'} is missing or unreadable")
    usable = {e["name"]: e for e in index["candidates"] if e["status"] in ("compressed", "original")}
    for e in usable.values():  # a compressed folder lives in this run, wherever the run directory moved
        if e["status"] == "compressed":
            e["path"] = str(ctx.input("models") / e["name"])
    failed = [e for e in index["candidates"] if e["status"] == "failed"]
    return usable, failed


def candidate_outcome(result, name: str, spec: JobSpec, workers: int, book: Book) -> dict[str, Any]:
    """One trial's record from Tune's result and the driver's book: status, learning curve, costs, timeline."""
    df = result.metrics_dataframe
    rows = [] if df is None or df.empty else df.to_dict("records")
    curve = [{k: r[k] for k in CURVE_KEYS if k in r and r[k] == r[k]} for r in rows if "step" in r]
    last = rows[-1] if rows else {}
    steps = int(last.get("step", 0))
    rec = book.record(name)
    phases = {**timeline.from_metrics(last), **driver_phases(rec, last, book.t0)}
    began = last.get("trial_started_at") or rec.started or book.t0
    seconds = max(0.0, (rec.ended or time.time()) - began)
    out: dict[str, Any] = {"name": name, "steps": steps, "curve": curve, "workers": workers,
                           "worker_seconds": round(seconds * workers, 3), "trial_seconds": round(seconds, 3),
                           "timeline": timeline.summarise(phases)}
    for k in ("train_tokens", "train_flops", "forward_params", "trainable_params", "restarts"):
        if k in last:
            out[k] = last[k]
    if result.error is not None:
        out["status"], out["reason"] = "failed", _reason(result.error)
    elif name == book.winner:
        out["status"] = "decided"  # the last one standing, stopped where the choice was made
    elif steps < book.planned_steps:
        out["status"] = "stopped_early"
    else:
        out["status"] = "finished"
    if curve:
        out["final"] = {k: v for k, v in curve[-1].items() if k in ("eval_loss", "eval_loss_token", "exact_match",
                                                                      "rouge_l", "accuracy")}
        out["score"] = curve[-1].get(spec.select.metric)
    return out


def driver_phases(rec, last: dict[str, Any], t0: float) -> dict[str, float]:
    """The timeline's phases only the driver sees: queued, the trial actor's start, the teardown."""
    entered = last.get("trial_started_at")
    out = {"waiting_for_resources": (rec.started or t0) - t0}
    if entered and rec.started:
        out["trial_start"] = entered - rec.started
    if rec.ended and rec.last_result:
        out["teardown"] = rec.ended - rec.last_result
    return {k: max(0.0, v) for k, v in out.items()}


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # Train wraps the worker's exception: the last line names the root cause.
    return f"{type(err).__name__}: {lines[-1][:300] if lines else ''}"


@register_stage
class FinetuneStage(Stage):
    name = "finetune"
    output = "finetune"
    needs = ("data", "models")
    spec_keys = ("data", "finetune", "tune", "select")
    version = "1"

    def run(self, ctx: StageContext) -> dict[str, Any]:
        spec, ft, tn = ctx.spec, ctx.spec.finetune, ctx.spec.tune
        usable, failed_upstream = trainable_candidates(ctx)
        if not usable:
            raise RuntimeError("no candidate left to fine-tune: the model stage failed them all")
        ctx.runtime  # noqa: B018 - start (or join) Ray
        per_trial = worker_resources(ft.num_workers, ft.use_gpu, ft.resources_per_worker)
        cluster = ray.cluster_resources()
        fits = fitting_trials(cluster, per_trial)
        if fits < 1:
            raise RuntimeError(f"one trial needs {per_trial} but the cluster has {cluster}: lower "
                               "finetune.num_workers or resources_per_worker")
        concurrent = min(len(usable), fits, tn.max_concurrent_trials or len(usable))
        storage = ft.storage_path or str(ctx.out.resolve())
        data_dir = ctx.input("data").resolve()
        steps = planned_steps(ft, pq.ParquetFile(data_dir / "train.parquet").metadata.num_rows)
        rungs = asha_rungs(tn.grace_period, tn.reduction_factor, steps) if tn.scheduler == "asha" else []
        barrier = new_barrier_name() if tn.sync_rungs and rungs and concurrent > 1 else None
        train_path, eval_path = str(data_dir / "train.parquet"), str(data_dir / "eval.parquet")
        plans = {c.name: TrialPlan(c.name, train_args(
            spec, c.name, str(Path(usable[c.name]["path"]).resolve()), train_path, eval_path, rungs, barrier,
            c.trust_remote_code, steps), storage_path=storage.rstrip("/") + "/train")
            for c in spec.candidates if c.name in usable}
        scaling = {"num_workers": ft.num_workers, "use_gpu": ft.use_gpu,
                   "resources_per_worker": ft.resources_per_worker}
        log.info("finetune: %d candidates, %d steps each, %d at once (%s per trial, %s; cluster %s), %s, "
                 "rungs at steps %s%s", len(plans), steps, concurrent, per_trial,
                 "Ray Train local mode in the trial" if ft.local else "Ray Train worker group",
                 {k: cluster[k] for k in ("CPU", "GPU") if k in cluster}, tn.scheduler, rungs or "-",
                 " (synchronised)" if barrier else "")
        t0 = time.monotonic()
        book = Book(planned_steps=steps, decide=bool(rungs) and not tn.finish_winner, expected=len(plans))
        grid = tune_candidates(plans, book, scaling=scaling, metric=spec.select.metric, mode=spec.select.mode,
                               scheduler=tn.scheduler, grace_period=tn.grace_period,
                               reduction_factor=tn.reduction_factor, max_concurrent=concurrent,
                               max_failures=ft.max_failures, storage_path=storage, rung_timeout_s=tn.rung_timeout_s,
                               barrier_name=barrier, local=ft.local)
        outcomes = {}
        for result in grid:
            name = result.config["candidate"]
            outcomes[name] = candidate_outcome(result, name, spec, ft.num_workers, book)
        for e in failed_upstream:
            outcomes[e["name"]] = {"name": e["name"], "status": "failed", "steps": 0, "curve": [],
                                   "reason": f"model stage: {e.get('reason', 'failed')}", "worker_seconds": 0.0}
        entries = [outcomes[c.name] for c in spec.candidates if c.name in outcomes]
        seconds = time.monotonic() - t0
        atomic_write_json(ctx.out / "results.json", {
            "metric": spec.select.metric, "mode": spec.select.mode, "scheduler": tn.scheduler,
            "rungs": rungs, "sync_rungs": bool(barrier), "max_steps": steps, "epochs": ft.epochs,
            "max_concurrent_trials": concurrent, "num_workers": ft.num_workers, "method": ft.method,
            "deepspeed": ft.deepspeed.model_dump(), "finish_winner": tn.finish_winner,
            "decided_at": book.decided_at, "winner": book.winner,
            "seconds": round(seconds, 3), "candidates": entries})
        counts = {s: sum(e["status"] == s for e in entries) for s in ("finished", "decided", "stopped_early", "failed")}
        metrics.record_trials(spec.name, counts)
        for e in entries:
            log.info("finetune: %s %s after %d steps, %s=%s, %.1f worker-s%s", e["name"], e["status"], e["steps"],
                     spec.select.metric, _fmt(e.get("score")), e["worker_seconds"],
                     f" ({e['reason']})" if e.get("reason") else "")
        if counts["failed"] == len(entries):
            raise RuntimeError("every candidate failed: " + "; ".join(f"{e['name']}: {e['reason']}" for e in entries))
        return {"candidates": len(entries), **counts, "trials_at_once": concurrent}


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"
