"""What this run cost against fine-tuning every candidate in full, in the job's units.

The full fine-tuning is projected from this run's own measurements: the training throughput its
trials reached (training FLOPs per worker-second of training), the fixed start-up a trial paid, and
the data the full runs would train on (every readable row, the prompts uncompressed, the original
models unpruned, the same epochs and steps). Units: GPU-hours on GPU jobs, CPU-hours otherwise.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from damoc.plan import planned_steps
from damoc.rundir import read_json


def savings(run_dir: Path, ranking: dict[str, Any]) -> dict[str, Any] | None:
    results = read_json(run_dir / "finetune" / "results.json") or {}
    manifest = read_json(run_dir / "data" / "manifest.json") or {}
    try:
        spec = yaml.safe_load((run_dir / "spec.yaml").read_text()) or {}
    except OSError:
        return None
    entries = [e for e in results.get("candidates", []) if e.get("train_flops") and e.get("timeline")]
    if not entries or not manifest.get("kept"):
        return None
    ft = spec.get("finetune", {})
    per_worker = ft.get("resources_per_worker") or {}
    unit, per = ("GPU", per_worker.get("GPU", 1)) if ft.get("use_gpu") else ("CPU", per_worker.get("CPU", 1))
    train_ws = sum(e["timeline"]["training"] * e.get("workers", 1) for e in entries)
    flops_per_ws = sum(e["train_flops"] for e in entries) / max(1e-9, train_ws)
    fixed = sum(e["timeline"]["fixed"] for e in entries) / len(entries)
    rows_per_step = ft.get("batch_size", 8) * ft.get("num_workers", 1) * ft.get("grad_accum", 1)
    kept = manifest["kept"]
    # Tokens per trained row, then per row as the full runs would train it (prompts uncompressed).
    per_row = sum(e.get("train_tokens", 0) for e in entries) / max(1, sum(e["steps"] * rows_per_step for e in entries))
    per_row_full = per_row + (manifest.get("tokens_before", 0) - manifest.get("tokens_after", 0)) / max(1, kept)
    full_rows = manifest.get("readable", kept)
    full_steps = planned_steps(SimpleNamespace(**{**{"epochs": None, "max_steps": 200, "batch_size": 8,
                                                     "num_workers": 1, "grad_accum": 1}, **ft}), full_rows)
    projected, per_candidate = 0.0, {}
    for e in results.get("candidates", []):
        c = read_json(run_dir / "models" / e["name"] / "compression.json") or {}
        params = c.get("params_before") or e.get("forward_params")
        if not params:
            continue
        flops = 6.0 * params * full_steps * rows_per_step * per_row_full
        ws = flops / flops_per_ws + fixed * e.get("workers", 1)
        per_candidate[e["name"]] = {"flops": flops, "worker_seconds": ws}
        projected += ws
    this = ranking["cost"]["worker_seconds"]
    hours = lambda ws: ws * per / 3600  # noqa: E731 - a worker holds `per` GPUs (or CPUs)
    return {"unit": f"{unit}-hours", "this_run": hours(this), "full_projected": hours(projected),
            "ratio": projected / this if this else None,
            "full_flops": sum(v["flops"] for v in per_candidate.values()),
            "this_run_flops": ranking["cost"]["train_flops"], "per_candidate": per_candidate,
            "assumptions": [f"throughput {flops_per_ws / 1e9:.3g} GFLOP/s per worker, measured in this run's training",
                            f"{fixed:.1f} s of fixed start-up per trial (this run's mean)",
                            f"{full_rows:,d} rows x {full_steps} steps of {rows_per_step} rows, "
                            f"{per_row_full:.0f} tokens per row (prompts uncompressed), original models"]}
