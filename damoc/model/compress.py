"""One candidate, start to finish: load -> score -> prune -> merge -> save -> compression.json.

Plain Python (no Ray), so tests and the benchmark can call it directly; the stage runs it in
one Ray actor per candidate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from damoc.lm.arch import adapter_for
from damoc.lm.load import load_causal_lm, pad_id, within_window
from damoc.lm.nll import bits_per_byte, rows_bits_per_byte
from damoc.lm.prompts import render
from damoc.lm.tokens import Example, encode
from damoc.model.merge import merge_layers, merge_targets
from damoc.model.prune import (
    choose_contiguous,
    choose_discrete,
    choose_last,
    layers_removed,
    n_to_remove,
    remove_layers,
)
from damoc.model.scores import batches, calibrate, forward_losses
from damoc import records
from damoc.spec import ModelSpec


@dataclass
class Source:
    """Where a candidate's weights come from, and what loading it may do."""

    name: str
    location: str  # local folder or hub id
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False


def pick_dtype(spec_dtype: str, device: str) -> torch.dtype:
    if spec_dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec_dtype]


def load(src: Source, dtype: torch.dtype, device: str):
    return load_causal_lm(src.location, trust_remote_code=src.trust_remote_code, revision=src.revision,
                          allow_pickle=src.allow_pickle_weights, dtype=dtype, device=device)


def calibration_examples(tok, rows: list[dict[str, str]], task: str, template: str,
                         max_length: int) -> list[Example]:
    """The calibration rows encoded as training encodes them for this candidate (answer labelled)."""
    out = [encode(tok, render(task, r["instruction"], r["input"], tok, template).text, r["output"], max_length)
           for r in rows]
    out = [e for e in out if len(e.ids) >= 2]  # a next-token loss needs two tokens
    if not out:
        raise ValueError("no calibration row has two or more tokens")
    return out


def answer_bits_per_byte(model, examples: list[Example], pad: int, batch_size: int) -> float:
    """The calibration rows' answer loss in bits per UTF-8 byte: what pruning damages, comparable across
    tokenizers and with the eval figures."""
    return bits_per_byte(forward_losses(model, batches(examples, batch_size, pad), every=False).answer,
                         answer_bytes(examples))


def answer_bytes(examples: list[Example]) -> int:
    return sum(e.answer_bytes for e in examples)


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def protected_layers(num_layers: int, m: ModelSpec) -> list[int]:
    return [0, num_layers - 1] if m.protect_first_last and num_layers > 2 else []


def scores_shown(cal, m: ModelSpec) -> list[float]:
    """The per-layer scores the report plots (Block Influence where the order is not a score)."""
    return cal.angular[0] if m.score == "angular" else cal.block_influence


def order_removed(cal, m: ModelSpec, num_layers: int, n: int) -> list[int]:
    """The n layers to remove, by the spec's order."""
    if m.score == "last_layers":
        return choose_last(num_layers, n, m.protect_first_last)
    if m.prune == "contiguous":
        return choose_contiguous(cal.angular, n, m.protect_first_last)
    return choose_discrete(scores_shown(cal, m), n, m.protect_first_last)


def largest_within(damage_at, most: int, max_damage: float) -> tuple[int, dict[int, float]]:
    """The largest count n <= most whose damage_at(n) stays within max_damage of damage_at(0) (relative),
    and every value it probed by count. It assumes the damage grows with the count, as it mostly does
    (bench/results/prune_damage-*.md), and probes 1, 2, 4, ... until one is over budget, then bisects:
    a real model keeps most of its layers within budget, so the answer is small and found in about
    2 log2(n) + 1 probes, where bisecting from `most` takes log2(most) however small n is."""
    trace = {0: damage_at(0)}

    def within(n: int) -> bool:
        trace[n] = damage_at(n)
        return trace[n] <= trace[0] * (1 + max_damage)

    lo, hi = 0, most
    while lo < hi:  # gallop
        n = min(max(1, 2 * lo), hi)
        if not within(n):
            hi = n - 1
            break
        lo = n
    while lo < hi:  # bisect
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if within(mid) else (lo, mid - 1)
    return lo, trace


def choose_layers(model, cal, m: ModelSpec, num_layers: int, damage_of,
                  original: float | None = None) -> tuple[list[int], dict[str, Any]]:
    """The layers to remove and the damage record. A fixed prune_ratio removes that many. `auto` removes
    the most layers whose calibration answer loss stays within max_damage of the original's (relative),
    up to max_prune_ratio (`largest_within`), each probe a forward pass over the calibration rows with
    those layers taken out of the loaded model. `original`: the unpruned model's figure where it is known
    (the calibration pass measures it)."""
    def damage_at(n: int) -> float:
        if n == 0:
            return damage_of(model) if original is None else original
        with layers_removed(model, order_removed(cal, m, num_layers, n)):
            return damage_of(model)

    if m.prune_ratio == "auto":
        n, trace = largest_within(damage_at, n_to_remove(num_layers, m.max_prune_ratio, m.protect_first_last),
                                  m.max_damage)
    else:
        n = n_to_remove(num_layers, m.prune_ratio, m.protect_first_last)
        trace = {0: damage_at(0), n: damage_at(n)} if n else {0: damage_at(0)}
    removed = order_removed(cal, m, num_layers, n)
    original, pruned = trace[0], trace[n]
    return removed, {"metric": "calibration answer loss, bits per byte", "original": original, "pruned": pruned,
                     "relative": (pruned - original) / original if original else None,
                     "max_damage": m.max_damage if m.prune_ratio == "auto" else None,
                     "probes": {str(k): v for k, v in sorted(trace.items())}}


@dataclass
class Loaded:
    """A candidate loaded for compression, with its calibration rows rendered and batched."""

    tok: Any
    model: Any
    adapter: Any
    device: str
    dtype: Any
    layers_before: int
    params_before: int
    max_length: int  # the eval rows' length, within the model's context window
    examples: list
    data: list


def load_for_compression(src: Source, rows: list[dict[str, str]], m: ModelSpec, task: str, template: str,
                         max_length: int) -> Loaded:
    device = "cuda" if m.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    dtype = pick_dtype(m.dtype, device)
    tok, model = load(src, dtype, device)
    adapter = adapter_for(model.config)
    # sequences never longer than the model's positions
    examples = calibration_examples(tok, rows, task, template, within_window(m.calibration.max_length, model.config))
    return Loaded(tok, model, adapter, device, dtype, adapter.num_layers(model.config), param_count(model),
                  within_window(max_length, model.config), examples,
                  batches(examples, m.calibration.batch_size, pad_id(tok)))


def compress_candidate(src: Source, rows: list[dict[str, str]], m: ModelSpec, out: Path, seed: int = 0,
                       task: str = "qa", template: str = "auto", eval_rows: list[dict[str, str]] | None = None,
                       max_length: int = 512, score_compressed: bool = True) -> dict[str, Any]:
    """Compress one candidate into `out` (an HF folder) and write out/compression.json. With `eval_rows`,
    the zero-shot answer loss (bits per byte) of the original model is measured on them: the free
    baseline, at the cost of a forward pass; with `score_compressed`, of the compressed one too (the
    pipeline leaves that to the finetune stage, whose step 0 scores the same model on the same rows)."""
    times = {"start": time.perf_counter()}
    c = load_for_compression(src, rows, m, task, template, max_length)
    times["load"] = time.perf_counter()
    zero_shot = {}
    if eval_rows:  # the free baseline: the original model's loss on the eval rows, and what it cost
        zero_shot["original"] = rows_bits_per_byte(c.model, c.tok, eval_rows, task, template, c.max_length)
        zero_shot["seconds"] = round(time.perf_counter() - times["load"], 3)
    cal = calibrate(c.model, c.adapter, c.data)
    times["score"] = time.perf_counter()
    removed, damage = choose_layers(
        c.model, cal, m, c.layers_before,
        lambda mdl: answer_bits_per_byte(mdl, c.examples, pad_id(c.tok), m.calibration.batch_size),
        original=bits_per_byte(cal.answer_nll, answer_bytes(c.examples)))
    times["choose"] = time.perf_counter()
    per_layer = scores_shown(cal, m)
    original = list(c.adapter.layer_list(c.model))  # keeps the removed layers alive for merging
    layers_after = remove_layers(c.model, removed)
    pruned_loss = forward_losses(c.model, c.data).mean if removed else cal.loss
    changed = merge_layers(original, removed, m.merge.method, m.merge.density, m.merge.scale, seed)
    del original
    merged_loss = forward_losses(c.model, c.data).mean if changed else pruned_loss
    if eval_rows:
        if score_compressed:
            zero_shot["compressed"] = rows_bits_per_byte(c.model, c.tok, eval_rows, task, template, c.max_length)
        zero_shot["rows"] = len(eval_rows)
    times["compress"] = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    c.model.save_pretrained(out, safe_serialization=True)
    c.tok.save_pretrained(out)
    report = {
        "name": src.name, "source": src.location, "status": "compressed",
        "model_type": c.model.config.model_type, "device": c.device, "dtype": str(c.dtype).removeprefix("torch."),
        "score": m.score, "prune": m.prune, "prune_ratio": round(len(removed) / c.layers_before, 4),
        "prune_rule": "auto" if m.prune_ratio == "auto" else "fixed", "damage": damage,
        "scores": per_layer, "block_influence": cal.block_influence,
        "angular_block": cal.angular[len(removed) - 1] if removed else [],
        "removed": removed, "protected": protected_layers(c.layers_before, m),
        "layers_before": c.layers_before, "layers_after": layers_after,
        "params_before": c.params_before, "params_after": param_count(c.model),
        "merge": merge_record(m, removed, c.layers_before, changed),
        "calibration_loss": {"original": cal.loss, "pruned": pruned_loss, "merged": merged_loss},
        # Forward passes over the calibration rows: scores, each damage probe, the pruned and merged losses.
        "passes": len(damage["probes"]) + bool(removed) + bool(changed),
        "zero_shot": zero_shot or None,
        "calibration": {"rows": len(rows), "sequences": len(c.examples), "tokens": cal.tokens,
                        "max_length": m.calibration.max_length, "task": task, "template": template},
        **step_seconds(times, cal.seconds),
    }
    records.write(records.Compression, out / "compression.json", report)
    return report


def merge_record(m: ModelSpec, removed: list[int], layers_before: int, changed: int) -> dict[str, Any]:
    return {"method": m.merge.method, "density": m.merge.density, "scale": m.merge.scale,
            "into": {str(k): v for k, v in merge_targets(removed, layers_before).items()} if removed else {},
            "entries_changed": changed}


def step_seconds(times: dict[str, float], score_seconds: float) -> dict[str, Any]:
    """The candidate's seconds, in all and by step (load, score, choose, prune/merge/eval, save)."""
    now, t0 = time.perf_counter(), times["start"]
    return {"seconds": round(now - t0, 3),
            "seconds_by_step": {"load": round(times["load"] - t0, 3), "score": round(score_seconds, 3),
                                "choose": round(times["choose"] - times["score"], 3),
                                "prune_merge_eval": round(times["compress"] - times["load"] - score_seconds
                                                          - (times["choose"] - times["score"]), 3),
                                "save": round(now - times["compress"], 3)}}
