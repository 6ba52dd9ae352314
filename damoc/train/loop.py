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

from damoc.lm.load import load_causal_lm, pad_id, within_window
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
    """One worker of a candidate's trial: set up (model, rows, engine, a checkpoint to resume from), report
    step 0 (the zero-shot point), then train, evaluating, checkpointing and reporting at the report steps
    (every eval_every, every rung, the last); at a synchronised rung, wait for the others' figures."""
    entered = time.time()
    args: TrainArgs = config["args"]
    reset_peak_memory()
    timeline = Timeline()
    with timeline.phase("imports"):
        import_stack(args)
    worker = Worker(args, timeline, entered)
    if not worker.resumed:
        worker.report_zero_shot()
    worker.train()


class Worker:
    """What one training worker holds from setup to its last report."""

    def __init__(self, args: TrainArgs, timeline: Timeline, entered: float):
        import ray.train
        import ray.train.torch
        import torch

        from damoc.train.engine import build_engine, resolve_precision

        self.report_fn, get_checkpoint = result_channel(args)
        self.rank, self.world = self._place(args)
        torch.set_num_threads(max(1, args.threads))
        torch.manual_seed(args.seed)
        self.device = ray.train.torch.get_device()
        dtype = resolve_precision(args.precision, args.deepspeed, self.device.type == "cuda")
        with timeline.phase("model_load"):
            args = on_this_node(args)
            self.tok, self.model, self.forward_params = load_model(args, self.device)
        # a hub original, whose window the stage could not read ahead
        args = replace(args, max_length=within_window(args.max_length, self.model.config))
        self.args, self.timeline = args, timeline
        self.trainable_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.node = ray.get_runtime_context().get_node_id()  # where this attempt runs (results.json lists them)
        self.chat = float(uses_chat(self.tok, args.template))  # which prompt shape this candidate trains on
        self._data(timeline)
        with timeline.phase("engine_init"):
            self.engine = build_engine(self.model, args, dtype, self.device)
        self.synced = self.engine.zero_stage == 3 and self.world > 1
        self.resumed = self._restore(get_checkpoint(), entered)
        self.start_step = self.state["step"]  # where this attempt starts: 0, or its checkpoint's step
        self.batches = Batches(self.examples, args.batch_size, args.seed + self.rank, self.state["position"])
        self.reports = report_steps(args.max_steps, args.eval_every, args.rungs)
        self.prev_rows = None  # the per-row figures of the last report (a restart has none until its next)

    @staticmethod
    def _place(args: TrainArgs) -> tuple[int, int]:
        import ray.train

        if args.local:  # the Tune trial's own process is the one worker
            local_process_group()
            return 0, 1
        tctx = ray.train.get_context()
        return tctx.get_world_rank(), tctx.get_world_size()

    def _data(self, timeline: Timeline) -> None:
        from damoc.train.evaluate import EvalSet, all_sum

        args = self.args
        with timeline.phase("data_ready"):
            self.examples = shard_examples(self.tok, args, self.rank, self.world)
            self.eval_set = EvalSet(self.tok, read_rows(args.eval_path, args.eval_limit), args, self.rank, self.world)
        # training rows longer than max_length, over every worker
        self.rows_cut = int(all_sum([sum(e.prompt_cut > 0 for e in self.examples)], self.device)[0])

    def _restore(self, checkpoint, entered: float) -> bool:
        """The state to start from: a fresh one, or a checkpoint's (a retried or resumed attempt)."""
        args = self.args
        self.state = {"step": 0, "tokens": 0, "position": 0, "seconds": 0.0, "restarts": 0, "timeline": {},
                      "micro_batch": args.batch_size, "previous": None,  # (step, metric) of the last report
                      # What the last report after training began was judged by (RUNG_SCORE): a rung's ranking
                      # must agree with it. Not step 0's: a pruned model before it healed is no fine-tuning ranking.
                      "previous_score": None}
        if not checkpoint:
            if args.trial_started_at is not None:  # a restart's own start-up is not measured from the trial's
                self.timeline.add("worker_group_start", entered - args.trial_started_at)
            return False
        with self.timeline.phase("checkpointing"), checkpoint.as_directory() as d:
            self.state = {**self.state, **self.engine.load(Path(d))}
        self.state["restarts"] += 1
        # A retry in smaller micro-batches (after running out of memory) goes on from the same rows.
        self.state["position"] = self.state["position"] * self.state.get("micro_batch", args.batch_size) // args.batch_size
        self.state["micro_batch"] = args.batch_size
        # The phases of earlier attempts, then this attempt's start-up on top.
        self.timeline = Timeline({k: v + self.timeline.seconds.get(k, 0.0) for k, v in self.state["timeline"].items()})
        return True

    def common(self, step: int) -> dict[str, Any]:
        """What every report carries besides the evaluation."""
        return {"step": step, "train_tokens": self.state["tokens"],
                "train_flops": 6.0 * self.forward_params * self.state["tokens"], "forward_params": self.forward_params,
                "trainable_params": self.trainable_params, "start_step": self.start_step, "workers": self.world,
                "restarts": self.state["restarts"], "chat_template": self.chat, "micro_batch": self.args.batch_size,
                "peak_rss_bytes": peak_memory(), "trial_started_at": self.args.trial_started_at, "node": self.node}

    def evaluate(self, generation: bool) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
        from damoc.train.evaluate import evaluate, gather_rows

        rows: dict[int, dict[str, float]] = {}
        result = evaluate(self.engine.module, self.tok, self.eval_set, self.args, self.device, generation,
                          self.synced, rows)
        return result, gather_rows(rows, self.world)

    def report_zero_shot(self) -> None:
        """Step 0: the zero-shot point of the learning curve (the free baseline)."""
        from damoc.train.rungs import RUNG_SCORE

        with self.timeline.phase("evaluation"):
            result, rows = self.evaluate(False)
        if self.rank == 0:
            save_rows(self.args, 0, rows)
        self.state["previous"], self.prev_rows = (0, result[self.args.metric]), rows
        self.report_fn({**result, RUNG_SCORE: result[self.args.metric], **self.common(0), **self.timeline.metrics()})

    def train(self) -> None:
        """The step loop: train, and at each report step evaluate, wait at a rung, checkpoint and report."""
        args, tally = self.args, Tally()
        self.model.train()
        for step in range(self.start_step + 1, args.max_steps + 1):
            self.step(step, tally)
            if step not in self.reports:
                continue
            self.timeline.add("training", time.perf_counter() - tally.since)
            metrics, rows = self.measure(step, tally)
            self.wait_at_rung(step, metrics, rows)
            self.save_and_report(step, metrics, rows)
            if self.decided(step):
                break
            tally.reset()

    def step(self, step: int, tally: Tally) -> None:
        """One optimizer step over grad_accum micro-batches."""
        t_step, pad = time.perf_counter(), pad_id(self.tok)
        for _ in range(self.args.grad_accum):
            batch = {k: v.to(self.device) for k, v in collate(self.batches.next(), pad).items()}
            loss = self.engine.loss(batch)
            value = float(loss.detach())
            if not math.isfinite(value):  # a retry from the checkpoint would only meet it again
                raise FloatingPointError(f"training loss is {value} at step {step}: the candidate cannot be trained "
                                         "as configured (lr, precision, or broken weights)")
            self.engine.backward(loss)
            self.engine.step()
            tally.add(value, int(batch["attention_mask"].sum()))
        if step == self.start_step + 1:  # an attempt's first step is slow (allocations, lazy state): the
            self.state["warmup_seconds"] = self.state.get("warmup_seconds", 0.0) + time.perf_counter() - t_step
            self.state["warmup_steps"] = self.state.get("warmup_steps", 0) + 1  # report projects from the rest

    def measure(self, step: int, tally: Tally) -> tuple[dict[str, Any], dict[int, dict[str, float]]]:
        """The evaluation at a report step, with the training figures since the last one."""
        from damoc.train.evaluate import all_sum
        from damoc.train.rungs import RUNG_SCORE, rung_score

        args, state = self.args, self.state
        with self.timeline.phase("evaluation"):
            result, rows = self.evaluate(args.metric in ("exact_match", "rouge_l") or step == args.max_steps)
            step_tokens, loss_total, loss_count = all_sum([tally.tokens, tally.loss_sum, tally.loss_n], self.device)
        state.update(step=step, tokens=state["tokens"] + int(step_tokens), position=self.batches.position,
                     seconds=state["seconds"] + time.monotonic() - tally.t0)
        return {**result, **self.common(step), "epoch": round(self.batches.epoch, 3),
                "train_loss": loss_total / max(1.0, loss_count), "lr": self.engine.lr,
                "train_seconds": round(state["seconds"], 3), "warmup_seconds": round(state.get("warmup_seconds", 0.0), 3),
                "warmup_steps": state.get("warmup_steps", 0), "rows_cut": self.rows_cut,
                RUNG_SCORE: rung_score(result[args.metric], state["previous"], step, args.max_steps, args.mode)}, rows

    def wait_at_rung(self, step: int, metrics: dict[str, Any], rows) -> None:
        """At a synchronised rung, rank 0 waits for the other trials' figures and learns its fate; then the
        figures this report was judged by become the previous ones."""
        from damoc.paired import Trend
        from damoc.train.rungs import RUNG_SCORE, Evidence, wait_turn

        args, state = self.args, self.state
        value = metrics[args.metric]
        if self.rank == 0 and step in args.rungs and args.barrier:
            sign = -1.0 if args.mode == "min" else 1.0  # the barrier ranks higher-is-better
            before = state["previous_score"]
            trend = Trend(self.prev_rows, state["previous"][0], step, args.max_steps) if self.prev_rows else None
            with self.timeline.phase("rung_wait"):
                metrics.update(wait_turn(args.barrier, args.candidate, step, sign * metrics[RUNG_SCORE],
                                         Evidence(None if before is None else sign * before, rows, trend)))
        state["previous"], state["previous_score"] = (step, value), metrics[RUNG_SCORE]
        self.prev_rows = rows

    def save_and_report(self, step: int, metrics: dict[str, Any], rows) -> None:
        import ray.train

        if self.rank == 0:
            record_report(self.args.job, self.args.candidate, self.args.metric, metrics)
            save_rows(self.args, step, rows)
        with self.timeline.phase("checkpointing"), tempfile.TemporaryDirectory(prefix="damoc-ckpt-") as tmp:
            self.state["timeline"] = self.timeline.seconds
            wrote = self.engine.save(Path(tmp), self.rank, self.state)
            self.report_fn({**metrics, **self.timeline.metrics()},
                           checkpoint=ray.train.Checkpoint.from_directory(tmp) if wrote else None)
            # After the report: a trial stopped at this report ends inside it, so the adapter on disk is
            # always one whose result Tune has taken.
            export_adapter(self.engine, self.args, step, self.rank)

    def decided(self, step: int) -> bool:
        """At a synchronised rung, whether the choice is made and this trial (the last one left) ends."""
        from damoc.train.evaluate import all_sum
        from damoc.train.rungs import hold_if_decided

        if step not in self.args.rungs or not self.args.barrier:
            return False
        ends = 0.0
        if self.rank == 0:
            with self.timeline.phase("rung_wait"):  # the last one standing waits here for the decision
                ends = float(hold_if_decided(self.args.barrier, self.args.candidate, step))
        return all_sum([ends], self.device)[0] > 0  # every rank ends with it (the others wait in this sum)


class Tally:
    """Training loss and tokens since the last report, and when that report was."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.t0, self.since = time.monotonic(), time.perf_counter()
        self.loss_sum, self.loss_n, self.tokens = 0.0, 0, 0

    def add(self, loss: float, tokens: int) -> None:
        self.loss_sum, self.loss_n, self.tokens = self.loss_sum + loss, self.loss_n + 1, self.tokens + tokens
