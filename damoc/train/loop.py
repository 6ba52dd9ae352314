"""The per-worker training loop that Ray Train runs on every worker of a trial.

Read top to bottom: load the candidate (LoRA through peft, or full fine-tuning); take this
worker's shard of the training rows from Ray Data and tokenise it with the task's template
(loss on answer tokens only); step with DeepSpeed or DDP, warmup + cosine lr, gradient
accumulation; every `eval_every` steps (and at each ASHA rung and the last step) evaluate,
save a checkpoint and `ray.train.report` the metrics. A restarted worker group resumes from
the latest checkpoint: weights, optimizer, schedule, step, token count and data position.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

from damoc.metrics import record_report
from damoc.train.examples import Example, collate, encode, prompt_text

TEXT = ("instruction", "input", "output")


def load_model(cfg: dict[str, Any], device: str = "cpu"):
    """Tokenizer and model (the reference-LM loader: fp32, safetensors only); LoRA adapters attached
    when asked. The KV cache is off for training forwards; generation asks for it."""
    from damoc.data.lm import load_causal_lm

    tok, model = load_causal_lm(cfg["model_path"], cfg["trust_remote_code"], device)
    forward_params = sum(p.numel() for p in model.parameters())
    if cfg["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        lora = cfg["lora"]
        model = get_peft_model(model, LoraConfig(
            task_type="CAUSAL_LM", r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
            target_modules=lora_targets(model.config, lora["target_modules"])))
    model.config.use_cache = False
    return tok, model, forward_params


def lora_targets(config, wanted):
    """'auto': the family's attention + MLP projections; 'all-linear' or an explicit list as given."""
    if wanted != "auto":
        return wanted
    from damoc.model.adapters import ADAPTERS

    adapter = ADAPTERS.get(getattr(config, "model_type", None))
    return list(adapter.lora_targets) if adapter else "all-linear"


def shard_examples(tok, cfg: dict[str, Any]) -> list[Example]:
    """This worker's training rows from Ray Data, tokenised once (the compressed set is small by design)."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    out: list[Example] = []
    for batch in shard.iter_batches(batch_size=1024, batch_format="numpy"):
        for ins, inp, ans in zip(*(batch[c] for c in TEXT)):
            out.append(encode(tok, prompt_text(cfg["task"], str(ins), None if inp is None else str(inp)),
                              str(ans), cfg["max_length"]))
    if not out:
        raise ValueError("this worker's shard of the training set is empty (fewer rows than workers?)")
    return out


def read_eval_rows(path: str, limit: int | None) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path, columns=list(TEXT)).to_pylist()
    return rows[:limit] if limit else rows


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


def report_steps(max_steps: int, eval_every: int, rungs: list[int]) -> set[int]:
    """Steps that evaluate, checkpoint and report: every eval_every, every ASHA rung, and the last."""
    return set(range(eval_every, max_steps + 1, eval_every)) | {r for r in rungs if r <= max_steps} | {max_steps}


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    import torch
    import ray.train
    import ray.train.torch

    from damoc.train.engine import build_engine, resolve_precision
    from damoc.train.evaluate import EvalSet, all_sum, evaluate
    from damoc.train.rungs import wait_turn

    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    torch.set_num_threads(max(1, cfg["threads"]))
    torch.manual_seed(cfg["seed"])
    device = ray.train.torch.get_device()
    dtype = resolve_precision(cfg["precision"], cfg["deepspeed"]["enabled"], device.type == "cuda")
    tok, model, forward_params = load_model(cfg, device)
    trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    examples = shard_examples(tok, cfg)
    eval_set = EvalSet(tok, read_eval_rows(cfg["eval_path"], cfg.get("eval_limit")), cfg, rank, world)
    engine = build_engine(model, cfg, dtype, device, warmup=int(cfg["warmup_ratio"] * cfg["max_steps"]))
    synced = engine.zero_stage == 3 and world > 1
    state = {"step": 0, "tokens": 0, "position": 0, "seconds": 0.0, "restarts": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = engine.load(Path(d))
        state["restarts"] += 1
    batches = Batches(examples, cfg["batch_size"], cfg["seed"] + rank, state["position"])
    reports = report_steps(cfg["max_steps"], cfg["eval_every"], cfg["rungs"])
    start_step, t0, loss_sum, loss_n, tokens = state["step"], time.monotonic(), 0.0, 0, 0
    model.train()
    for step in range(start_step + 1, cfg["max_steps"] + 1):
        for _ in range(cfg["grad_accum"]):
            batch = {k: v.to(device) for k, v in collate(batches.next(), tok.pad_token_id).items()}
            loss = engine.loss(batch)
            engine.backward(loss)
            engine.step()
            loss_sum, loss_n = loss_sum + float(loss.detach()), loss_n + 1
            tokens += int(batch["attention_mask"].sum())
        if step not in reports:
            continue
        generation = cfg["metric"] in ("exact_match", "rouge_l") or step == cfg["max_steps"]
        result = evaluate(engine.module, tok, eval_set, cfg, device, generation, synced)
        step_tokens, loss_total, loss_count = all_sum([tokens, loss_sum, loss_n], device)
        train_loss = loss_total / max(1.0, loss_count)
        state.update(step=step, tokens=state["tokens"] + int(step_tokens), position=batches.position,
                     seconds=state["seconds"] + time.monotonic() - t0)
        metrics = {**result, "step": step, "epoch": round(batches.epoch, 3), "train_loss": train_loss,
                   "lr": engine.lr, "train_tokens": state["tokens"], "forward_params": forward_params,
                   "trainable_params": trainable_params, "train_flops": 6.0 * forward_params * state["tokens"],
                   "train_seconds": round(state["seconds"], 3), "restarts": state["restarts"],
                   "start_step": start_step, "workers": world}
        if rank == 0 and step in cfg["rungs"] and cfg.get("barrier"):
            sign = -1.0 if cfg["mode"] == "min" else 1.0  # the barrier ranks higher-is-better
            wait_turn(cfg["barrier"], cfg["candidate"], step, sign * metrics[cfg["metric"]])
        if rank == 0:
            record_report(cfg.get("job", ""), cfg["candidate"], cfg["metric"], metrics)
        with tempfile.TemporaryDirectory(prefix="damoc-ckpt-") as tmp:
            wrote = engine.save(Path(tmp), rank, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if wrote else None)
        t0, loss_sum, loss_n, tokens = time.monotonic(), 0.0, 0, 0
