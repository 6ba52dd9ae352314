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

import hashlib
import logging
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import ray

from damoc import metrics
from damoc.lm.load import within_window
from damoc.lm.memory import GIB, length_bound
from damoc.pipeline import Stage, StageContext, register_stage
from damoc.lm.figures import candidate_figures
from damoc.schedule import planned_steps, resolve_grace, rungs_for, scheduler
from damoc import records
from damoc.rundir import read_json
from damoc.runtime import fitting
from damoc.spec import JobSpec, is_uri
from damoc.store import is_remote
from damoc.train import timeline
from damoc.train.args import train_args
from damoc.train.driver import (
    Book,
    TrialPlan,
    new_barrier_name,
    out_of_memory,
    trackers,
    tune_candidates,
    worker_resources,
)

log = logging.getLogger("damoc.train")

STATE_DIR = ".finetune-state"
CURVE_KEYS = ("step", "eval_loss", "eval_loss_token", "exact_match", "rouge_l", "accuracy", "train_loss",
              "lr", "train_tokens", "train_seconds", "epoch", "restarts")


def trainable_candidates(ctx: StageContext) -> tuple[dict[str, dict], list[dict]]:
    """Candidates the model stage left usable ({name: entry}) and those it failed."""
    index = records.load(records.ModelsIndex, ctx.input("models") / "models.json")
    if not index:
        raise FileNotFoundError(f"{ctx.input('models') / 'models.json'} is missing or unreadable")
    usable = {e["name"]: e for e in index["candidates"] if e["status"] in ("compressed", "original")}
    for e in usable.values():  # a compressed folder lives in this run, wherever the run directory moved
        if e["status"] == "compressed":
            e["path"] = str(ctx.input("models") / e["name"])
    failed = [e for e in index["candidates"] if e["status"] == "failed"]
    return usable, failed


def remove_prefixes(root: str, prefix: str) -> None:
    """Delete every folder directly under the URI `root` whose name starts with `prefix`."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(root)
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith(prefix):
            fs.delete_dir(info.path)


def model_location(ctx: StageContext, entry: dict[str, Any]) -> str:
    """The folder a trial loads: the compressed one as every node reaches it, or the candidate as it is."""
    if entry["status"] == "compressed":
        return ctx.shared(f"models/{entry['name']}")
    return str(Path(entry["path"]).resolve()) if not is_uri(entry["path"]) else entry["path"]


def candidate_sizes(ctx: StageContext, usable: dict[str, dict]) -> list[tuple[float, float]]:
    """(parameters before the model stage, parameters trained) of each usable candidate: from its
    compression record, else as `damoc plan` reads them (its config, shapes only; else `params:`)."""
    sizes = {}
    for name, e in usable.items():
        c = records.compression(Path(e["path"])) or {}
        if c.get("params_before") and c.get("params_after"):
            sizes[name] = (float(c["params_before"]), float(c["params_after"]))
    if len(sizes) < len(usable):  # trained as they are
        for f in candidate_figures(ctx.spec, str(ctx.base_dir)):
            if f.name in usable and f.name not in sizes and f.params:
                sizes[f.name] = (f.params, f.params)
    return list(sizes.values())


def grace_period(ctx: StageContext, usable: dict[str, dict], steps: int) -> tuple[int, dict[str, Any] | None]:
    """tune.grace_period in steps; for auto, with what it was derived from (kept in results.json)."""
    tn, ft = ctx.spec.tune, ctx.spec.finetune
    if tn.grace_period != "auto":
        return tn.grace_period, None
    full_rows = (records.load(records.Manifest, ctx.input("data") / "manifest.json") or {}).get("readable") or \
        pq.ParquetFile(ctx.input("data") / "train.parquet").metadata.num_rows
    params = candidate_sizes(ctx, usable)
    full_steps = planned_steps(ft, full_rows)
    grace, saving = resolve_grace(tn, len(usable), full_steps, steps, [p[0] for p in params], [p[1] for p in params])
    info = {"grace_period": grace, "target_saving": tn.target_saving, "projected_saving": round(saving, 2),
            "full_rows": full_rows, "full_steps": full_steps, "floor": tn.min_grace_period}
    log.log(logging.INFO if saving >= tn.target_saving else logging.WARNING,
            "finetune: grace period auto: %d steps; the schedule projects %.1fx fewer rows x parameters than "
            "fine-tuning every candidate in full (%d rows, %d steps each)%s", grace, saving, full_rows, full_steps,
            "" if saving >= tn.target_saving else
            f": the {tn.target_saving:g}x asked for is out of reach above tune.min_grace_period")
    return grace, info


def candidate_outcome(result, name: str, spec: JobSpec, workers: int, book: Book,
                      memory: dict[str, Any] | None = None) -> dict[str, Any]:
    """One trial's record from Tune's result and the driver's book: status, learning curve, costs, timeline."""
    df = result.metrics_dataframe
    rows = [] if df is None or df.empty else df.to_dict("records")
    curve = [{k: r[k] for k in CURVE_KEYS if k in r and r[k] == r[k]} for r in rows if "step" in r]
    last = rows[-1] if rows else {}
    steps = int(last.get("step", 0))
    rec = book.record(name)
    phases = {**timeline.from_metrics(last), **driver_phases(rec, last, book.t0)}
    began = rec.entered or rec.started  # None: no attempt running (lost or paused, and not back)
    seconds = (max(0.0, (rec.ended or time.time()) - began) if began else 0.0) + rec.earlier_seconds  # every attempt
    out: dict[str, Any] = {"name": name, "steps": steps, "curve": curve, "workers": workers,
                           "worker_seconds": round(seconds * workers, 3), "trial_seconds": round(seconds, 3),
                           "timeline": timeline.summarise(phases), "attempts": max(1, rec.attempts),
                           "earlier_seconds": round(rec.earlier_seconds, 3)}
    for k in ("train_tokens", "train_flops", "forward_params", "trainable_params", "restarts", "start_step",
              "micro_batch", "warmup_seconds", "warmup_steps", "rows_cut"):
        if k in last:
            out[k] = last[k]
    if memory:
        peak = max((r["peak_rss_bytes"] for r in rows if r.get("peak_rss_bytes") == r.get("peak_rss_bytes")
                    and r.get("peak_rss_bytes")), default=None)
        out["memory"] = {**memory, "peak_gib": round(peak / GIB, 2) if peak else None,
                         "memory_failures": rec.memory_failures}
    for key in ("kept_because", "cut_because"):  # rungs where the ranking was not steady enough to stop it,
        # and the one where it fell below the cut (how sure that was)
        why = {str(int(r["step"])): r[key] for r in rows if isinstance(r.get(key), str)}
        if why:
            out[key] = why
    out["nodes"] = sorted({r["node"] for r in rows if isinstance(r.get("node"), str)} | set(rec.lost_on))  # every attempt's
    if "chat_template" in last:
        out["prompt"] = "chat template" if last["chat_template"] else "plain"
    if result.error is not None:
        out["status"], out["reason"] = "failed", _reason(result.error, memory, rec.memory_failures)
    elif name == book.winner and book.decide:
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


def source_of(spec: JobSpec, name: str) -> dict[str, Any]:
    """Where a candidate came from: its hub id and revision, or its path."""
    c = next(c for c in spec.candidates if c.name == name)
    return {"source": {"hf": c.hf, "revision": c.revision} if c.hf else {"path": c.path}}


def keep_outputs(storage: str, out: Path, entries: list[dict[str, Any]]) -> None:
    """Into the stage's folder: every report's per-row eval figures (the pick's confidence is computed
    from them) and the LoRA adapter of each candidate that finished or won, in PEFT's format. The rest of
    the sweep's state (DeepSpeed checkpoints, Tune's files) stays internal."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(storage) if is_uri(storage) else (pafs.LocalFileSystem(), storage)
    for e in entries:
        rows = f"{root}/eval_rows/{e['name']}"
        if fs.get_file_info(rows).type == pafs.FileType.Directory:
            (out / "eval_rows" / e["name"]).mkdir(parents=True, exist_ok=True)
            pafs.copy_files(rows, str(out / "eval_rows" / e["name"]), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
        adapter = f"{root}/adapters/{e['name']}"
        if e.get("status") in ("finished", "decided") and \
                fs.get_file_info(adapter).type == pafs.FileType.Directory:
            (out / "adapters" / e["name"]).mkdir(parents=True, exist_ok=True)
            pafs.copy_files(adapter, str(out / "adapters" / e["name"]), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
            info = read_json(out / "adapters" / e["name"] / "damoc.json") or {}
            e["adapter"] = {"path": f"adapters/{e['name']}", "step": info.get("step")}


def driver_phases(rec, last: dict[str, Any], t0: float) -> dict[str, float]:
    """The timeline's phases only the driver sees: queued, the trial actor's start, the teardown."""
    entered = rec.entered or last.get("trial_started_at")
    out = {"waiting_for_resources": (rec.started or t0) - t0 if rec.attempts <= 1 else 0.0}
    if entered and rec.started:
        out["trial_start"] = entered - rec.started
    if rec.ended and rec.last_result:
        out["teardown"] = rec.ended - rec.last_result
    return {k: max(0.0, v) for k, v in out.items()}


def _reason(err: BaseException, memory: dict[str, Any] | None = None, memory_failures: int = 0) -> str:
    if out_of_memory(err):
        need = f" (needs ~{memory['estimate_gib']:g} GiB a worker)" if memory else ""
        retried = ", after a retry in smaller micro-batches" if memory_failures > 1 else ""
        return f"out of memory{need}{retried}: {type(err).__name__}"
    text = str(err).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # Train wraps the worker's exception: the last line names the root cause.
    return f"{type(err).__name__}: {lines[-1][:300] if lines else ''}"


def memory_estimates(ctx: StageContext, plans: dict[str, TrialPlan], length: int) -> dict[str, dict[str, Any]]:
    """Per candidate, what one worker needs (damoc/lm/memory.py) and what it asks Ray for: the estimate, or
    finetune.resources_per_worker's `memory` where set, never more than the largest node has (a request no
    node can meet would wait forever; such a trial runs alone there, and is said to be at risk)."""
    from damoc.lm.memory import finetune_memory, meta_shape

    ft = ctx.spec.finetune
    nodes = [n["Resources"].get("memory", 0.0) for n in ray.nodes() if n.get("Alive")]
    largest = int(0.9 * max(nodes, default=0.0))  # room for what else holds memory there
    trust = {c.name: c.trust_remote_code for c in ctx.spec.candidates}
    out = {}
    for name, plan in plans.items():
        path = str(ctx.input("models") / name) if is_remote(plan.args.model_path) else plan.args.model_path
        try:
            shape = meta_shape(path, ft.lora.target_modules, trust[name])
        except Exception as exc:  # noqa: BLE001 - a config the meta device cannot build: ask for nothing
            log.warning("finetune: %s: no memory estimate (%s); its trial asks Ray for CPUs only", name, exc)
            continue
        est = finetune_memory(shape, ft, min(length, plan.args.max_length))
        asked = int((ft.resources_per_worker or {}).get("memory", est.host))
        if largest and asked > largest:
            log.warning("finetune: %s needs ~%.1f GiB a worker; the largest node has %.1f GiB for tasks: it "
                        "runs alone there and may be killed for memory", name, asked / GIB, largest / GIB)
            asked = largest
        plan.memory = asked
        out[name] = {"estimate_gib": round(est.host / GIB, 2), "requested_gib": round(asked / GIB, 2),
                     "device_gib": round(est.device / GIB, 2), "length": min(length, plan.args.max_length),
                     "terms_gib": {k: round(v / GIB, 3) for k, v in est.as_dict().items()}}
    return out


@register_stage
class FinetuneStage(Stage):
    name = "finetune"
    output = "finetune"
    needs = ("data", "models")
    spec_keys = ("data", "finetune", "tune", "select")
    version = "3"  # 2: ASHA judges the trend-projected rung score; trials ask for memory. 3: lost trials yielded to

    @staticmethod
    def state_dir(ctx: StageContext) -> tuple[str, bool]:
        """Where the sweep's Tune and Train state lives (checkpoints, experiment state), and whether an
        interrupted sweep with the same inputs is there to resume. It sits beside the stage's folder,
        not in it (a stage's folder exists only complete), under RUN/.finetune-state or
        finetune.storage_path; a new sweep clears what an older one left there."""
        from ray import tune

        ft = ctx.spec.finetune
        root = ft.storage_path.rstrip("/") if ft.storage_path else ctx.shared(STATE_DIR)
        where = ctx.remote.uri if ctx.remote else str(ctx.run_dir.resolve())
        run_key = hashlib.sha1(where.encode()).hexdigest()[:6]  # two runs never share
        here = f"{root}/{ctx.spec.name}-{run_key}-{ctx.fingerprint or 'run'}"
        if ctx.resume and tune.Tuner.can_restore(here + "/tune"):
            return here, True
        if not is_uri(here):
            shutil.rmtree(here, ignore_errors=True)
            if not ft.storage_path:  # ours alone: sweeps of other inputs are stale
                for old in Path(root).glob(f"{ctx.spec.name}-*"):
                    shutil.rmtree(old, ignore_errors=True)
        elif not ft.storage_path:  # the run's own state on object storage: the same, on the bucket
            remove_prefixes(root, f"{ctx.spec.name}-")
        return here, False

    @staticmethod
    def window(max_length: int, path: str) -> int:
        """finetune.max_length, cut to the candidate's context window where its config says it is shorter
        (a GPT-2 with 256 positions fails every step with an index error otherwise)."""
        return within_window(max_length, path)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        usable, failed_upstream = trainable_candidates(ctx)
        if not usable:
            raise RuntimeError("no candidate left to fine-tune: the model stage failed them all")
        ctx.runtime  # noqa: B018 - start (or join) Ray
        sweep = self.setup(ctx, usable)
        t0 = time.monotonic()
        book = Book(planned_steps=sweep.steps, decide=bool(sweep.rungs) and not ctx.spec.tune.finish_winner,
                    expected=len(sweep.plans), metric=ctx.spec.select.metric, rungs=sweep.rungs,
                    key=ctx.fingerprint or new_barrier_name())
        grid, book = self.tune(ctx, sweep, book)
        entries = self.entries(ctx, sweep, grid, book, failed_upstream)
        keep_outputs(sweep.storage, ctx.out, entries)
        self.write_results(ctx, sweep, book, entries, time.monotonic() - t0)
        return self.counts(ctx, entries, sweep.concurrent)

    def setup(self, ctx: StageContext, usable: dict[str, dict]) -> Sweep:
        """The sweep's schedule, trials and their resources, and how many run at once."""
        spec, ft, tn = ctx.spec, ctx.spec.finetune, ctx.spec.tune
        per_trial = worker_resources(ft.num_workers, ft.use_gpu, ft.resources_per_worker)
        cluster = ray.cluster_resources()
        fits = fitting(cluster, per_trial)
        if fits < 1:
            raise RuntimeError(f"one trial needs {per_trial} but the cluster has {cluster}: lower "
                               "finetune.num_workers or resources_per_worker")
        storage, restore = self.state_dir(ctx)
        train_rows = pq.ParquetFile(ctx.input("data") / "train.parquet").metadata.num_rows
        steps = planned_steps(ft, train_rows)
        grace, auto = grace_period(ctx, usable, steps) if scheduler(tn).stops_early else (tn.grace_period, None)
        sweep = Sweep(storage, restore, train_rows, steps, grace, auto, rungs_for(tn, grace, steps),
                      min(len(usable), fits, tn.max_concurrent_trials or len(usable)))
        train_path, eval_path = ctx.shared("data/train.parquet"), ctx.shared("data/eval.parquet")
        sweep.plans = {c.name: TrialPlan(c.name, replace(train_args(
            spec, c.name, model_location(ctx, usable[c.name]), train_path, eval_path, sweep.rungs, None,
            c.trust_remote_code, steps), rows_dir=f"{storage}/eval_rows", export_dir=f"{storage}/adapters",
            max_length=self.window(ft.max_length, usable[c.name]["path"])),
            storage_path=storage.rstrip("/") + "/train")
            for c in spec.candidates if c.name in usable}
        self.fit_memory(ctx, sweep, cluster)
        if tn.sync_rungs and sweep.rungs and sweep.concurrent > 1:
            # Named after the stage's inputs: a resumed sweep's trials and callback find the new barrier.
            sweep.barrier = f"damoc-rungs-{ctx.fingerprint}" if ctx.fingerprint else new_barrier_name()
            for plan in sweep.plans.values():
                plan.args = replace(plan.args, barrier=sweep.barrier)
        log.info("finetune: %d candidates, %d steps each, %d at once (%s per trial, %s; cluster %s), %s, "
                 "rungs at steps %s%s", len(sweep.plans), steps, sweep.concurrent, per_trial,
                 "Ray Train local mode in the trial" if ft.local else "Ray Train worker group",
                 {k: cluster[k] for k in ("CPU", "GPU") if k in cluster}, tn.scheduler, sweep.rungs or "-",
                 " (synchronised)" if sweep.barrier else "")
        return sweep

    @staticmethod
    def fit_memory(ctx: StageContext, sweep: Sweep, cluster: dict[str, float]) -> None:
        """Each trial's memory request, and fewer trials at once where memory allows fewer."""
        ft = ctx.spec.finetune
        rows = pq.read_table(ctx.input("data") / "train.parquet", columns=["instruction", "input", "output"])
        plans = sweep.plans
        sweep.memory = memory_estimates(ctx, plans, length_bound(rows.to_pylist(), ft.max_length))
        if ft.local:  # one request for every trial, the largest: Tune reuses a trial's process only for the same
            shared = max((p.memory for p in plans.values()), default=0)  # resources (a new one costs ~5 s)
            for name, plan in plans.items():
                plan.memory = shared
                if name in sweep.memory:
                    sweep.memory[name]["requested_gib"] = round(shared / GIB, 2)
        need = ft.num_workers * max((p.memory for p in plans.values()), default=0)
        mem_fits = fitting(cluster, {"memory": need}) if need else sweep.concurrent
        if mem_fits < sweep.concurrent:
            log.info("finetune: memory allows %d trial(s) at once (%s a worker)", max(1, mem_fits),
                     ", ".join(f"{n} ~{m['requested_gib']:g} GiB" for n, m in sweep.memory.items()))
            sweep.concurrent = max(1, mem_fits)

    @staticmethod
    def tune(ctx: StageContext, sweep: Sweep, book: Book):
        spec, ft, tn = ctx.spec, ctx.spec.finetune, ctx.spec.tune
        storage = sweep.storage
        tracking = trackers(tn.callbacks, spec.name, str(ctx.run_dir / STATE_DIR) if is_uri(storage) else storage,
                            tn.mlflow_uri)
        scaling = {"num_workers": ft.num_workers, "use_gpu": ft.use_gpu, "resources_per_worker": ft.resources_per_worker}
        grid, book = tune_candidates(sweep.plans, book, scaling=scaling, metric=spec.select.metric,
                                     mode=spec.select.mode, scheduler=tn.scheduler, grace_period=sweep.grace,
                                     reduction_factor=tn.reduction_factor, max_concurrent=sweep.concurrent,
                                     max_failures=ft.max_failures, storage_path=storage,
                                     rung_timeout_s=tn.rung_timeout_s, barrier_name=sweep.barrier, local=ft.local,
                                     restore=sweep.restore, tracking=tracking, stop_confidence=tn.stop_confidence,
                                     seed=spec.seed)
        unfinished = len(sweep.plans) - grid.num_terminated - grid.num_errors
        if unfinished:  # a stage is done only once every trial is: never rank what the sweep did not decide
            raise RuntimeError(f"the sweep returned with {unfinished} of {len(sweep.plans)} trial(s) neither "
                               "finished nor failed; the same command resumes it")
        return grid, book

    @staticmethod
    def entries(ctx: StageContext, sweep: Sweep, grid, book: Book, failed_upstream: list[dict]) -> list[dict]:
        """Every candidate's record, in the spec's order: its trial's, or the model stage's failure."""
        spec, ft = ctx.spec, ctx.spec.finetune
        outcomes = {}
        for result in grid:
            name = result.config["candidate"]
            outcomes[name] = candidate_outcome(result, name, spec, ft.num_workers, book, sweep.memory.get(name))
        for e in failed_upstream:
            outcomes[e["name"]] = {"name": e["name"], "status": "failed", "steps": 0, "curve": [],
                                   "reason": f"model stage: {e.get('reason', 'failed')}", "worker_seconds": 0.0}
        entries = [outcomes[c.name] for c in spec.candidates if c.name in outcomes]
        for e in entries:
            e.update(source_of(spec, e["name"]))
            plan = sweep.plans.get(e["name"])
            if plan is not None and plan.args.max_length < ft.max_length:
                e["max_length"] = plan.args.max_length
                if e.get("rows_cut"):  # said only where a row was longer than the window
                    e["note"] = (f"{int(e['rows_cut'])} of {sweep.train_rows} training rows cut to its "
                                 f"{e['max_length']}-token context window (finetune.max_length {ft.max_length})")
                    log.warning("finetune: %s: %s", e["name"], e["note"])
        return entries

    @staticmethod
    def write_results(ctx: StageContext, sweep: Sweep, book: Book, entries: list[dict], seconds: float) -> None:
        spec, ft, tn = ctx.spec, ctx.spec.finetune, ctx.spec.tune
        records.write(records.Results, ctx.out / "results.json", {
            "metric": spec.select.metric, "mode": spec.select.mode, "scheduler": tn.scheduler,
            "rungs": sweep.rungs, "grace_auto": sweep.auto, "sync_rungs": bool(sweep.barrier), "max_steps": sweep.steps,
            "epochs": ft.epochs, "max_concurrent_trials": sweep.concurrent, "num_workers": ft.num_workers,
            "method": ft.method, "deepspeed": ft.deepspeed.model_dump(), "finish_winner": tn.finish_winner,
            "decided_at": book.decided_at, "winner": book.winner, "resumed": book.resumed,
            "state": sweep.storage, "seconds": round(seconds, 3), "candidates": entries})

    @staticmethod
    def counts(ctx: StageContext, entries: list[dict], concurrent: int) -> dict[str, Any]:
        """The stage's counts (and its log lines); an error when every candidate failed."""
        spec = ctx.spec
        counts = {s: sum(e["status"] == s for e in entries) for s in ("finished", "decided", "stopped_early", "failed")}
        metrics.record_trials(spec.name, counts)
        for e in entries:
            log.info("finetune: %s %s after %d steps, %s=%s, %.1f worker-s%s", e["name"], e["status"], e["steps"],
                     spec.select.metric, _fmt(e.get("score")), e["worker_seconds"],
                     f" ({e['reason']})" if e.get("reason") else "")
        if counts["failed"] == len(entries):
            raise RuntimeError("every candidate failed: " + "; ".join(f"{e['name']}: {e['reason']}" for e in entries))
        return {"candidates": len(entries), **counts, "trials_at_once": concurrent}


@dataclass
class Sweep:
    """What the finetune stage decided before the sweep: where its state is, the schedule, the trials."""

    storage: str
    restore: bool
    train_rows: int
    steps: int
    grace: int
    auto: dict[str, Any] | None
    rungs: list[int]
    concurrent: int
    plans: dict[str, TrialPlan] = field(default_factory=dict)
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)
    barrier: str | None = None


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"
