"""The per-worker training loop that Ray Train runs on every worker of a trial.

Read top to bottom: import the stack and load the candidate (LoRA through peft, or full
fine-tuning); read this worker's slice of the training rows and tokenise it with the task's
template (loss on answer tokens only); step with DeepSpeed or DDP, warmup + cosine lr, gradient
accumulation; every `eval_every` steps (and at each ASHA rung and the last step) evaluate, save a
checkpoint and `ray.train.report` the metrics with the trial's timeline. A restarted worker group
resumes from the latest checkpoint: weights, optimizer, schedule, step, token count, data position
and the timeline so far.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from damoc.lm.load import context_window, load_causal_lm, pad_id
from damoc.lm.prompts import prompt_text, uses_chat
from damoc.lm.tokens import Example, collate, encode
from damoc.compat import forget_destroyed_groups
from damoc.metrics import record_report
from damoc.schedule import report_steps
from damoc.train.args import TrainArgs
from damoc.train.timeline import Timeline

TEXT = ("instruction", "input", "output")


def import_stack(args: TrainArgs) -> None:
    """The heavy imports, up front, so the timeline shows them apart from loading the model."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    if args.method == "lora":
        import peft  # noqa: F401
    if args.deepspeed:
        import deepspeed  # noqa: F401


def load_model(args: TrainArgs, device: str = "cpu"):
    """Tokenizer and model (fp32, safetensors only); LoRA adapters attached when asked. The KV cache
    is off for training forwards; generation asks for it."""
    tok, model = load_causal_lm(args.model_path, trust_remote_code=args.trust_remote_code, device=device)
    forward_params = sum(p.numel() for p in model.parameters())
    if args.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = args.lora
        model = get_peft_model(model, LoraConfig(
            task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=lora_targets(model.config, lora.target_modules)))
    model.config.use_cache = False
    return tok, model, forward_params


def lora_targets(config, wanted):
    """'auto': the family's attention + MLP projections; 'all-linear' or an explicit list as given."""
    if wanted != "auto":
        return list(wanted) if isinstance(wanted, tuple) else wanted
    from damoc.lm.arch import ADAPTERS

    adapter = ADAPTERS.get(getattr(config, "model_type", None))
    return list(adapter.lora_targets) if adapter else "all-linear"


def read_rows(path: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Text columns of a run-directory Parquet file (a local path or a URI reachable from every node)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(path, columns=list(TEXT)).to_pylist()
    return rows[:limit] if limit else rows


def shard_examples(tok, args: TrainArgs, rank: int, world: int) -> list[Example]:
    """This worker's rows (rows[rank::world], the same on every attempt, so a resumed worker continues
    the same shuffle), tokenised once. The compressed set is small by design: each worker reads the file
    itself instead of starting a Ray Data split per trial."""
    rows = read_rows(args.train_path)[rank::world]
    if not rows:
        raise ValueError(f"worker {rank} of {world} has no training rows ({args.train_path} has fewer rows "
                         "than workers)")
    return [encode(tok, prompt_text(args.task, str(r["instruction"]), r["input"], tok, args.template), str(r["output"]),
                   args.max_length) for r in rows]


class Batches:
    """Seeded per-epoch shuffles of this worker's examples; the position is part of a checkpoint."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, position: int = 0):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.per_epoch = max(1, len(examples) // batch_size)
        self.position = position  # micro-batches served so far

    def next(self) -> list[Example]:
        epoch, i = divmod(self.position, self.per_epoch)
        order = list(range(len(self.examples)))
        random.Random(self.seed * 100_003 + epoch).shuffle(order)
        self.position += 1
        return [self.examples[j] for j in order[i * self.batch_size:(i + 1) * self.batch_size]]

    @property
    def epoch(self) -> float:
        return self.position / self.per_epoch


def result_channel(args: TrainArgs):
    """(report, get_checkpoint). A worker group reports through Ray Train (rank 0's results reach Tune
    through TuneReportCallback); in local mode the loop runs inside the Tune trial itself, where Train's
    report would stop, so results and checkpoints go to Tune directly."""
    if args.local:
        from ray import tune

        return tune.report, tune.get_checkpoint
    import ray.train

    return ray.train.report, ray.train.get_checkpoint


def local_process_group() -> None:
    """DeepSpeed needs a process group and local mode starts none: one of world size 1 on a free port
    (not from RANK/MASTER_* variables, which would make Train's local controller start its own). A
    stopped trial's thread ends without tearing it down; the next trial in this process reuses it."""
    import torch.distributed as dist

    if not dist.is_initialized():
        forget_destroyed_groups()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def on_this_node(args: TrainArgs) -> TrainArgs:
    """The model and rows read from this node's disk: a run on object storage fetches them into the
    node's cache once (damoc.store.localize); a local or shared path is used as it is."""
    from damoc.store import localize

    return replace(args, model_path=localize(args.model_path), train_path=localize(args.train_path),
                   eval_path=localize(args.eval_path))


def save_json(path: str, payload: dict) -> None:
    """A small JSON file on the run's storage (a local or shared path, or a URI every node reaches)."""
    import json

    import pyarrow.fs as pafs

    fs, where = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
    fs.create_dir(where.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(where) as f:
        f.write(json.dumps(payload).encode())


def save_rows(args: TrainArgs, step: int, rows: dict[int, dict[str, float]]) -> None:
    if args.rows_dir:
        save_json(f"{args.rows_dir.rstrip('/')}/{args.candidate}/step-{step}.json",
                  {"step": step, "rows": {str(i): r for i, r in sorted(rows.items())}})


def export_adapter(engine, args: TrainArgs, step: int, rank: int) -> None:
    """The LoRA adapter as it is at this report, in PEFT's format (adapter_config.json + safetensors), so
    `PeftModel.from_pretrained(compressed model, folder)` loads it. ZeRO-3 shards the weights: the
    adapter's are gathered (all ranks take part) and rank 0 writes them."""
    if args.method != "lora" or not args.export_dir:
        return
    import contextlib
    import shutil

    import pyarrow.fs as pafs

    gathered = contextlib.nullcontext()
    if engine.zero_stage == 3:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(
            [p for p in engine.module.parameters() if p.requires_grad], modifier_rank=None)
    with gathered, tempfile.TemporaryDirectory(prefix="damoc-adapter-") as tmp:
        if rank != 0:
            return
        engine.module.save_pretrained(tmp, safe_serialization=True)
        (Path(tmp) / "damoc.json").write_text(f'{{"candidate": "{args.candidate}", "step": {step}}}')
        target = f"{args.export_dir.rstrip('/')}/{args.candidate}"
        if "://" in target:
            fs, where = pafs.FileSystem.from_uri(target)
            pafs.copy_files(tmp, where, destination_filesystem=fs)
        else:
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(tmp, target)


def reset_peak_memory() -> None:
    """Start this trial's peak resident memory afresh (Linux: clear_refs 5 resets VmHWM): a reused trial
    process would otherwise report the peak of the largest model it trained before."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory() -> int:
    """This process's peak resident memory in bytes since reset_peak_memory (0 where unknown)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def train_loop_per_worker(config: dict[str, Any]) -> None:
    entered = time.time()
    args: TrainArgs = config["args"]
    reset_peak_memory()
    timeline = Timeline()
    with timeline.phase("imports"):
        import_stack(args)
        import ray.train
        import ray.train.torch
        import torch

        from damoc.train.engine import build_engine, resolve_precision
        from damoc.train.evaluate import EvalSet, all_sum, evaluate, gather_rows
        from damoc.paired import Trend
        from damoc.train.rungs import RUNG_SCORE, Evidence, hold_if_decided, rung_score, wait_turn

    report, get_checkpoint = result_channel(args)
    if args.local:  # the Tune trial's own process is the one worker
        rank, world = 0, 1
        local_process_group()
    else:
        tctx = ray.train.get_context()
        rank, world = tctx.get_world_rank(), tctx.get_world_size()
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    device = ray.train.torch.get_device()
    dtype = resolve_precision(args.precision, args.deepspeed, device.type == "cuda")
    with timeline.phase("model_load"):
        args = on_this_node(args)
        tok, model, forward_params = load_model(args, device)
    window = context_window(model.config)
    if window is not None and window < args.max_length:  # a hub original the stage could not read ahead
        args = replace(args, max_length=window)
    trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    node = ray.get_runtime_context().get_node_id()  # where this attempt runs (results.json lists them)
    chat = float(uses_chat(tok, args.template))  # which prompt shape this candidate trains on
    pad = pad_id(tok)
    with timeline.phase("data_ready"):
        examples = shard_examples(tok, args, rank, world)
        eval_set = EvalSet(tok, read_rows(args.eval_path, args.eval_limit), args, rank, world)
    with timeline.phase("engine_init"):
        engine = build_engine(model, args, dtype, device)
    synced = engine.zero_stage == 3 and world > 1
    rows_cut = int(all_sum([sum(e.prompt_cut > 0 for e in examples)], device)[0])  # training rows longer than max_length
    state = {"step": 0, "tokens": 0, "position": 0, "seconds": 0.0, "restarts": 0, "timeline": {},
             "micro_batch": args.batch_size, "previous": None,  # previous: (step, metric) of the last report
             # What the last report after training began was judged by (RUNG_SCORE): a rung's ranking must
             # agree with it. Not step 0's: that is a pruned model before it healed, not a fine-tuning ranking.
             "previous_score": None}
    checkpoint = get_checkpoint()
    if checkpoint:
        with timeline.phase("checkpointing"), checkpoint.as_directory() as d:
            state = {**state, **engine.load(Path(d))}
        state["restarts"] += 1
        # A retry in smaller micro-batches (after running out of memory) goes on from the same rows.
        state["position"] = state["position"] * state.get("micro_batch", args.batch_size) // args.batch_size
        state["micro_batch"] = args.batch_size
        # The phases of earlier attempts, then this attempt's start-up on top.
        timeline = Timeline({k: v + timeline.seconds.get(k, 0.0) for k, v in state["timeline"].items()})
    elif args.trial_started_at is not None:  # a restart's own start-up is not measured from the trial's
        timeline.add("worker_group_start", entered - args.trial_started_at)
    batches = Batches(examples, args.batch_size, args.seed + rank, state["position"])
    reports = report_steps(args.max_steps, args.eval_every, args.rungs)
    prev_rows = None  # the per-row figures of the last report (in memory: a restart has none until its next)
    if not checkpoint:  # step 0: the zero-shot point of the learning curve (the free baseline)
        with timeline.phase("evaluation"):
            rows: dict[int, dict[str, float]] = {}
            result = evaluate(engine.module, tok, eval_set, args, device, False, synced, rows)
            rows = gather_rows(rows, world)
        if rank == 0:
            save_rows(args, 0, rows)
        state["previous"], prev_rows = (0, result[args.metric]), rows
        report({**result, RUNG_SCORE: result[args.metric], "step": 0, "train_tokens": 0, "train_flops": 0.0, "forward_params": forward_params,
                "trainable_params": trainable_params, "start_step": 0, "workers": world, "restarts": 0,
                "chat_template": chat, "micro_batch": args.batch_size, "peak_rss_bytes": peak_memory(),
                "trial_started_at": args.trial_started_at, "node": node, **timeline.metrics()})
    start_step, t0, loss_sum, loss_n, tokens = state["step"], time.monotonic(), 0.0, 0, 0
    model.train()
    t_train = time.perf_counter()
    for step in range(start_step + 1, args.max_steps + 1):
        t_step = time.perf_counter()
        for _ in range(args.grad_accum):
            batch = {k: v.to(device) for k, v in collate(batches.next(), pad).items()}
            loss = engine.loss(batch)
            value = float(loss.detach())
            if not math.isfinite(value):  # a retry from the checkpoint would only meet it again
                raise FloatingPointError(f"training loss is {value} at step {step}: the candidate cannot be trained "
                                         "as configured (lr, precision, or broken weights)")
            engine.backward(loss)
            engine.step()
            loss_sum, loss_n = loss_sum + value, loss_n + 1
            tokens += int(batch["attention_mask"].sum())
        if step == start_step + 1:  # an attempt's first step is slow (allocations, lazy state): the report
            state["warmup_seconds"] = state.get("warmup_seconds", 0.0) + time.perf_counter() - t_step  # projects
            state["warmup_steps"] = state.get("warmup_steps", 0) + 1  # full runs from the steps after it
        if step not in reports:
            continue
        timeline.add("training", time.perf_counter() - t_train)
        with timeline.phase("evaluation"):
            generation = args.metric in ("exact_match", "rouge_l") or step == args.max_steps
            rows = {}
            result = evaluate(engine.module, tok, eval_set, args, device, generation, synced, rows)
            rows = gather_rows(rows, world)
            step_tokens, loss_total, loss_count = all_sum([tokens, loss_sum, loss_n], device)
        train_loss = loss_total / max(1.0, loss_count)
        state.update(step=step, tokens=state["tokens"] + int(step_tokens), position=batches.position,
                     seconds=state["seconds"] + time.monotonic() - t0)
        metrics = {**result, "step": step, "epoch": round(batches.epoch, 3), "train_loss": train_loss,
                   "lr": engine.lr, "train_tokens": state["tokens"], "forward_params": forward_params,
                   "trainable_params": trainable_params, "train_flops": 6.0 * forward_params * state["tokens"],
                   "train_seconds": round(state["seconds"], 3), "restarts": state["restarts"],
                   "warmup_seconds": round(state.get("warmup_seconds", 0.0), 3), "warmup_steps": state.get("warmup_steps", 0),
                   "rows_cut": rows_cut,
                   "start_step": start_step, "workers": world, "trial_started_at": args.trial_started_at,
                   "chat_template": chat, "micro_batch": args.batch_size, "peak_rss_bytes": peak_memory(),
                   "node": node, RUNG_SCORE: rung_score(result[args.metric], state["previous"], step, args.max_steps, args.mode)}
        if rank == 0 and step in args.rungs and args.barrier:
            sign = -1.0 if args.mode == "min" else 1.0  # the barrier ranks higher-is-better
            before = state["previous_score"]
            trend = Trend(prev_rows, state["previous"][0], step, args.max_steps) if prev_rows else None
            with timeline.phase("rung_wait"):
                metrics.update(wait_turn(args.barrier, args.candidate, step, sign * metrics[RUNG_SCORE],
                                         Evidence(None if before is None else sign * before, rows, trend)))
        state["previous"], state["previous_score"], prev_rows = (step, result[args.metric]), metrics[RUNG_SCORE], rows
        if rank == 0:
            record_report(args.job, args.candidate, args.metric, metrics)
            save_rows(args, step, rows)
        with timeline.phase("checkpointing"), tempfile.TemporaryDirectory(prefix="damoc-ckpt-") as tmp:
            state["timeline"] = timeline.seconds
            wrote = engine.save(Path(tmp), rank, state)
            report({**metrics, **timeline.metrics()},
                   checkpoint=ray.train.Checkpoint.from_directory(tmp) if wrote else None)
            # After the report: a trial stopped at this report ends inside it, so the adapter on disk is
            # always one whose result Tune has taken.
            export_adapter(engine, args, step, rank)
        if step in args.rungs and args.barrier:
            ends = 0.0
            if rank == 0:
                with timeline.phase("rung_wait"):  # the last one standing waits here for the decision
                    ends = float(hold_if_decided(args.barrier, args.candidate, step))
            if all_sum([ends], device)[0] > 0:  # every rank ends with it (the others wait in this sum)
                break
        t0, loss_sum, loss_n, tokens = time.monotonic(), 0.0, 0, 0
        t_train = time.perf_counter()
