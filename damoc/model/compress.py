"""One candidate, start to finish: load -> score -> prune -> merge -> save -> compression.json.

Plain Python (no Ray), so tests and the benchmark can call it directly; the stage runs it in
one Ray actor per candidate.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from damoc.model.adapters import adapter_for, remove_layers
from damoc.model.merge import merge_layers, merge_targets
from damoc.model.prune import choose_contiguous, choose_discrete, n_to_remove
from damoc.model.scores import batches, calibrate, calibration_loss, encode
from damoc.report.plots import layer_scores_png
from damoc.rundir import atomic_write_json
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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = dict(revision=src.revision, trust_remote_code=src.trust_remote_code,
                  token=os.environ.get("HF_TOKEN") or None)
    tok = AutoTokenizer.from_pretrained(src.location, **common)
    model = AutoModelForCausalLM.from_pretrained(
        src.location, dtype=dtype, low_cpu_mem_usage=True,
        use_safetensors=None if src.allow_pickle_weights else True, **common)
    model.to(device).eval()
    return tok, model


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def choose_layers(cal, m: ModelSpec, num_layers: int) -> tuple[list[int], list[float]]:
    """The layers to remove and the per-layer scores shown for them."""
    n = n_to_remove(num_layers, m.prune_ratio, m.protect_first_last)
    per_layer = cal.block_influence if m.score == "block_influence" else cal.angular[0]
    if m.prune == "contiguous":
        return choose_contiguous(cal.angular, n, m.protect_first_last), per_layer
    return choose_discrete(per_layer, n, m.protect_first_last), per_layer


def compress_candidate(src: Source, texts: list[str], m: ModelSpec, out: Path, seed: int = 0) -> dict[str, Any]:
    """Compress one candidate into `out` (an HF folder) and write out/compression.json."""
    t0 = time.perf_counter()
    device = "cuda" if m.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    dtype = pick_dtype(m.dtype, device)
    tok, model = load(src, dtype, device)
    adapter = adapter_for(model.config)
    layers_before, params_before = adapter.num_layers(model.config), param_count(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    data = batches(encode(tok, texts, m.calibration.max_length), m.calibration.batch_size, pad)
    t_load = time.perf_counter()

    cal = calibrate(model, adapter, data)
    removed, per_layer = choose_layers(cal, m, layers_before)
    original = list(adapter.layer_list(model))  # keeps the removed layers alive for merging
    layers_after = remove_layers(model, removed)
    pruned_loss = calibration_loss(model, data)
    changed = merge_layers(original, removed, m.merge.method, m.merge.density, m.merge.scale, seed)
    del original
    merged_loss = calibration_loss(model, data) if changed else pruned_loss
    t_compress = time.perf_counter()

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    title = f"{src.name}: {m.score.replace('_', ' ')} per layer"
    layer_scores_png(out / "layer_scores.png", per_layer, removed, title, m.score.replace("_", " "))
    report = {
        "name": src.name, "source": src.location, "status": "compressed",
        "model_type": model.config.model_type, "device": device, "dtype": str(dtype).removeprefix("torch."),
        "score": m.score, "prune": m.prune, "prune_ratio": m.prune_ratio,
        "scores": per_layer, "block_influence": cal.block_influence,
        "angular_block": cal.angular[len(removed) - 1] if removed else [],
        "removed": removed, "layers_before": layers_before, "layers_after": layers_after,
        "params_before": params_before, "params_after": param_count(model),
        "merge": {"method": m.merge.method, "density": m.merge.density, "scale": m.merge.scale,
                  "into": {str(k): v for k, v in merge_targets(removed, layers_before).items()} if removed else {},
                  "entries_changed": changed},
        "calibration_loss": {"original": cal.loss, "pruned": pruned_loss, "merged": merged_loss},
        "calibration": {"rows": len(texts), "sequences": sum(len(b[0]) for b in data), "tokens": cal.tokens,
                        "max_length": m.calibration.max_length},
        "plot": "layer_scores.png",
        "seconds": round(time.perf_counter() - t0, 3),
        "seconds_by_step": {"load": round(t_load - t0, 3), "score": round(cal.seconds, 3),
                            "prune_merge_eval": round(t_compress - t_load - cal.seconds, 3),
                            "save": round(time.perf_counter() - t_compress, 3)},
    }
    atomic_write_json(out / "compression.json", report)
    return report
