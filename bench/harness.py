"""What every bench shares: its opening (arguments, logging, no inherited cluster), the plain full
fine-tuning loop a user would compare DaMoC against, and that loop's cache. The benches are a package:
run them as modules from the repository root, `.venv/bin/python -m bench.cost ...`."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from damoc.rundir import read_json

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench")


def opening(doc: str, configure: Callable[[argparse.ArgumentParser], None]) -> argparse.Namespace:
    """A bench's arguments (`configure` adds them), logging to the terminal, and no RAY_ADDRESS: a bench
    starts its own cluster rather than landing on whatever the shell points at."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(ap)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.pop("RAY_ADDRESS", None)
    return a


def test_helper(name: str):
    """A module of tests/ (a data generator, the S3 test server) loaded from its file."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def plain_full(spec: dict[str, Any], threads: int) -> dict[str, Any]:
    """Every candidate fine-tuned in full by a bare torch loop; seconds, FLOPs and final eval loss each."""
    import dataclasses

    import torch

    from damoc.data.readers import plan_units, read_unit
    from damoc.lm.load import pad_id
    from damoc.lm.prompts import prompt_text
    from damoc.lm.tokens import collate, encode
    from damoc.spec import spec_from_data
    from damoc.train.args import train_args
    from damoc.train.engine import build_engine
    from damoc.train.evaluate import EvalSet, evaluate
    from damoc.train.loop import Batches, load_model
    from damoc.schedule import planned_steps

    js = spec_from_data(spec, source=spec["name"])
    d, ft = js.data, js.finetune
    rows = [r for u in plan_units(d.train, str(REPO)) for r in read_unit(u, d.fields) if r.get("reason") is None]
    evals = [r for u in plan_units(d.eval, str(REPO)) for r in read_unit(u, d.fields) if r.get("reason") is None]
    evals = evals[: ft.eval_max_rows] if ft.eval_max_rows else evals
    steps = planned_steps(ft, len(rows))
    torch.set_num_threads(threads)
    out: dict[str, Any] = {"steps": steps, "rows": len(rows), "candidates": {}}
    for c in js.candidates:
        t0 = time.perf_counter()
        args = train_args(js, c.name, c.path, "", "", [], None, False, steps)
        torch.manual_seed(args.seed)
        tok, model, forward_params = load_model(args)
        exs = [encode(tok, prompt_text(d.task, r["instruction"], r["input"], tok, args.template), r["output"],
                      args.max_length) for r in rows]
        engine = build_engine(model, dataclasses.replace(args, deepspeed=False, local=True), torch.float32, "cpu")
        batches, pad, tokens = Batches(exs, args.batch_size, args.seed), pad_id(tok), 0
        model.train()
        for _ in range(steps):
            for _ in range(args.grad_accum):
                batch = collate(batches.next(), pad)
                loss = engine.loss(batch)
                engine.backward(loss)
                engine.step()
                tokens += int(batch["attention_mask"].sum())
        score = evaluate(model, tok, EvalSet(tok, evals, args, 0, 1), args, "cpu", generation=False)["eval_loss"]
        seconds = time.perf_counter() - t0
        out["candidates"][c.name] = {"seconds": round(seconds, 2), "flops": 6.0 * forward_params * tokens,
                                     "eval_loss": score, "tokens": tokens}
        log.info("plain full fine-tuning: %s %d steps in %.0fs, eval_loss %.4f", c.name, steps, seconds, score)
    out["seconds"] = sum(v["seconds"] for v in out["candidates"].values())
    out["flops"] = sum(v["flops"] for v in out["candidates"].values())
    return out


def plain_inputs(spec: dict[str, Any]) -> dict[str, Any]:
    """What the plain loops depend on: the rows, the candidates and the training recipe (not the DaMoC
    recipe, the run's name or folder, nor how often DaMoC evaluates)."""
    d = spec["data"]
    ft = {k: v for k, v in spec["finetune"].items() if k != "eval_every"}
    return {"data": {k: d.get(k) for k in ("train", "eval", "fields", "task")}, "candidates": spec["candidates"],
            "finetune": ft, "seed": spec["seed"]}


def plain_cached(spec: dict[str, Any], threads: int, folder: Path) -> dict[str, Any]:
    """plain_full, kept in `folder`: a bench cut short after its plain loops (half an hour on 2 cores)
    does not measure them again. Reused only for the same inputs and thread count (a DaMoC variant such
    as --grace reuses them); the table says when they were measured."""
    key = hashlib.sha1(json.dumps([plain_inputs(spec), threads], sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = folder / "plain.json"
    saved = read_json(path) if path.exists() else None
    if saved and saved.get("key") == key:
        log.info("plain full fine-tuning: reusing the loops measured at %s (%s)", saved["measured_at"], path)
        return saved
    out = plain_full(spec, threads) | {"key": key, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return out
