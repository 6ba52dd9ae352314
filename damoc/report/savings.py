"""What this run cost against fine-tuning every candidate in full, in the job's units.

The full fine-tuning is projected from this run's own measurements: the training throughput its
trials reached after their first step (training FLOPs per worker-second of training; a first step is
slow, and short trials are mostly first steps: on real LLMs on CPU they ran at ~60% of the steady rate),
the fixed start-up and first step a trial paid, and the data the full runs would train on (every
readable row, as long as the readable rows are on average: the selected ones are often longer; the
prompts uncompressed, the original models unpruned, the same epochs and steps). Units: GPU-hours on GPU
jobs, CPU-hours otherwise.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from damoc import records
from damoc.schedule import planned_steps, rows_per_step


def savings(run_dir: Path, ranking: dict[str, Any]) -> dict[str, Any] | None:
    results = records.read(records.Results, run_dir) or {}
    manifest = records.read(records.Manifest, run_dir) or {}
    ft = records.finetune_spec(run_dir)
    if ft is None:
        return None
    entries = [e for e in results.get("candidates", []) if e.get("train_flops") and e.get("timeline")]
    if not entries or not manifest.get("kept"):
        return None
    per_worker = ft.resources_per_worker or {}
    unit, per = ("GPU", per_worker.get("GPU", 1)) if ft.use_gpu else ("CPU", per_worker.get("CPU", 1))
    flops_per_ws, steady = throughput(entries)
    fixed = sum(e["timeline"]["fixed"] + warmup(e) for e in entries) / len(entries)
    per_step = rows_per_step(ft)
    kept = manifest["kept"]
    # Tokens per trained row, then per row as the full runs would train it (prompts uncompressed, rows
    # as long as the readable ones are on average).
    per_row = sum(e.get("train_tokens", 0) for e in entries) / max(1, sum(e["steps"] * per_step for e in entries))
    length = length_ratio(run_dir / "data")
    per_row_full = (per_row + (manifest.get("tokens_before", 0) - manifest.get("tokens_after", 0)) / max(1, kept)) * length
    full_rows = manifest.get("readable", kept)
    full_steps = planned_steps(ft, full_rows)
    projected, per_candidate = 0.0, {}
    for e in results.get("candidates", []):
        c = records.compression(run_dir / "models" / e["name"]) or {}
        params = c.get("params_before") or e.get("forward_params")
        if not params:
            continue
        flops = 6.0 * params * full_steps * per_step * per_row_full
        ws = flops / flops_per_ws + fixed * e.get("workers", 1)
        per_candidate[e["name"]] = {"flops": flops, "worker_seconds": ws}
        projected += ws
    this = ranking["cost"]["worker_seconds"]
    hours = lambda ws: ws * per / 3600  # noqa: E731 - a worker holds `per` GPUs (or CPUs)
    return {"unit": f"{unit}-hours", "this_run": hours(this), "full_projected": hours(projected),
            "ratio": projected / this if this else None,
            "full_flops": sum(v["flops"] for v in per_candidate.values()),
            "this_run_flops": ranking["cost"]["train_flops"], "per_candidate": per_candidate,
            "assumptions": [f"throughput {flops_per_ws / 1e9:.3g} GFLOP/s per worker, measured in this run's training"
                            + (" after each trial's first step" if steady else ""),
                            f"{fixed:.1f} s of fixed start-up and first step per trial (this run's mean)",
                            f"{full_rows:,d} rows x {full_steps} steps of {per_step} rows, "
                            f"{per_row_full:.0f} tokens per row (prompts uncompressed"
                            + (f"; the readable rows are {length:.2f}x as long as the kept ones" if length != 1 else "")
                            + "), original models"]}


def warmup(e: dict[str, Any]) -> float:
    """Seconds of a trial's first step (an attempt's first step; a full run pays one)."""
    return e.get("warmup_seconds", 0.0) / max(1, e.get("warmup_steps", 0))


def throughput(entries: list[dict[str, Any]]) -> tuple[float, bool]:
    """Training FLOPs per worker-second, after each attempt's first step where some trial trained past it
    (FLOPs per step taken as even), else over all steps; and whether it is the former."""
    flops = sum(e["train_flops"] * max(0, e["steps"] - e.get("warmup_steps", 0)) / max(1, e["steps"]) for e in entries)
    ws = sum((e["timeline"]["training"] - e.get("warmup_seconds", 0.0)) * e.get("workers", 1) for e in entries)
    if all(e.get("warmup_steps") for e in entries) and flops > 0 and ws > 0:
        return flops / ws, True
    ws = sum(e["timeline"]["training"] * e.get("workers", 1) for e in entries)
    return sum(e["train_flops"] for e in entries) / max(1e-9, ws), False


def length_ratio(data_dir: Path) -> float:
    """Mean length (the data stage's `chars` stat) of every training-side row over that of the kept ones:
    the full runs train on all of them. 1 where the stat is not there."""
    import pyarrow.parquet as pq

    try:
        kept = pq.read_table(data_dir / "train.parquet", columns=["chars"]).column("chars").to_pylist()
        dropped = pq.read_table(data_dir / "dropped.parquet", columns=["chars"]).column("chars").to_pylist() \
            if (data_dir / "dropped.parquet").exists() else []
    except (OSError, KeyError, ValueError):  # no such file or column
        return 1.0
    every = [c for c in kept + dropped if c is not None]
    kept = [c for c in kept if c is not None]
    if not every or not kept or not sum(kept):
        return 1.0
    return (sum(every) / len(every)) / (sum(kept) / len(kept))


def cost_words(ratio: float | None) -> str:
    """A full / DaMoC ratio in words: below 1 it is a cost, never a saving."""
    if ratio is None:
        return "-"
    if ratio == math.inf:
        return "no cost"
    return f"{ratio:.1f}x less" if ratio >= 1 else f"{1 / ratio:.1f}x MORE"
