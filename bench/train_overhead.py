"""Tokens/s of the Ray Train + DeepSpeed path against a plain single-process torch loop.

Same model (a Llama-like candidate built from a config), same rows (the zoo's API QA set),
same batch size, precision, optimizer and LoRA setup. The Ray side is one Ray Train worker
running DaMoC's per-worker loop under DeepSpeed; the plain side is a bare PyTorch loop in this
process. Printed per precision: steady-state tokens/s (the loop's own clock: training steps
only) and end-to-end tokens/s (wall clock from `fit()` / model load to the end, startup
included), and their ratios (target: steady-state ratio >= 0.8). Never run by the test suite.

    .venv/bin/python -m bench.train_overhead --steps 60 --hidden 256 --layers 4
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from damoc.lm.nll import causal_lm_loss
from damoc.lm.prompts import prompt_text
from damoc.lm.tokens import collate, encode
from damoc.train.args import LoraArgs, TrainArgs
from transformers import get_cosine_schedule_with_warmup

from damoc.train.engine import resolve_precision
from damoc.train.loop import Batches, load_model


def build(out: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    from damoc.zoo.corpus import api_qa_rows, stdlib_source
    from damoc.zoo.tiny import build_tiny_model, train_tokenizer

    tok = train_tokenizer(stdlib_source(max_chars=300_000), vocab_size=2048)
    model = build_tiny_model("llama", out / "model", tok, hidden=hidden, layers=layers, seed=0)
    rows = api_qa_rows()
    data = out / "data"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), data / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:32]), data / "eval.parquet")
    return model, data


def plain_loop(cfg: TrainArgs, data: Path) -> tuple[float, float]:
    """(steady tokens/s, end-to-end tokens/s) of a bare single-process loop."""
    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    dtype = resolve_precision(cfg.precision, True, False)
    tok, model, _ = load_model(cfg)
    model.to(dtype).train()
    rows = pq.read_table(data / "train.parquet").to_pylist()
    exs = [encode(tok, prompt_text("qa", r["instruction"], r["input"], tok, cfg.template), r["output"], cfg.max_length)
           for r in rows]
    batches = Batches(exs, cfg.batch_size, cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.max_steps)
    tokens, t_train = 0, 0.0
    for _ in range(cfg.max_steps):
        t = time.perf_counter()
        batch = collate(batches.next(), tok.pad_token_id)
        loss = causal_lm_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        t_train += time.perf_counter() - t
    return tokens / t_train, tokens / (time.perf_counter() - t_start)


def ray_train(cfg: TrainArgs, data: Path, storage: Path) -> tuple[float, float]:
    import ray.train
    from ray.train.torch import TorchTrainer

    from damoc.train.loop import train_loop_per_worker

    t_start = time.perf_counter()
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"args": cfg},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": cfg.threads}),
        run_config=ray.train.RunConfig(name="bench", storage_path=str(storage)))
    m = trainer.fit().metrics
    return m["train_tokens"] / m["train_seconds"], m["train_tokens"] / (time.perf_counter() - t_start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--method", default="lora", choices=["lora", "full"])
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--engines", default="deepspeed,ddp", help="deepspeed (ZeRO-2) and/or ddp (plain torch in the worker)")
    args = ap.parse_args()

    from damoc.runtime import connect

    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="damoc-bench-") as tmp:
        model, data = build(Path(tmp), args.hidden, args.layers)
        base = TrainArgs(candidate="bench", model_path=str(model), train_path=str(data / "train.parquet"),
                         eval_path=str(data / "eval.parquet"), max_new_tokens=8, method=args.method,
                         lora=LoraArgs(8, 16, 0.0, "auto"), batch_size=args.batch_size,
                         eval_batch_size=args.batch_size, lr=2e-4, max_steps=args.steps, max_length=256,
                         eval_every=args.steps, eval_limit=8, threads=threads)
        print(f"llama hidden {args.hidden}, {args.layers} layers, {args.method}, batch {args.batch_size}, "
              f"{args.steps} steps, {threads} CPU threads")
        with connect(None, num_cpus=threads):
            for precision in args.precisions.split(","):
                cfg = dataclasses.replace(base, precision=precision)
                plain_steady, plain_e2e = plain_loop(cfg, data)
                print(f"{precision}: plain loop {plain_steady:,.0f} tok/s steady, {plain_e2e:,.0f} end-to-end")
                for engine in args.engines.split(","):
                    cfg = dataclasses.replace(cfg, deepspeed=engine == "deepspeed")
                    label = "Ray Train + DeepSpeed ZeRO-2" if engine == "deepspeed" else "Ray Train, plain torch"
                    ray_steady, ray_e2e = ray_train(cfg, data, Path(tmp) / f"store-{precision}-{engine}")
                    print(f"{precision}: {label} (1 worker) {ray_steady:,.0f} tok/s steady, {ray_e2e:,.0f} "
                          f"end-to-end | ratio to the plain loop: steady {ray_steady / plain_steady:.2f}x, "
                          f"end-to-end {ray_e2e / plain_e2e:.2f}x")


if __name__ == "__main__":
    main()
