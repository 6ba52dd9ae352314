"""How much each pruning order damages a real LLM, layer by layer, and where `prune_ratio: auto` stops.

For a local HF folder (e.g. the real SmolLM2-135M-Instruct or Gemma 3 270M that bench/real_selection.py
converts), on QA rows of one domain rendered with the model's own prompt: the calibration answer loss
(bits per byte, what `auto` bounds) and the answer loss on held-out rows of the same domain, with 0, 1,
2, ... layers removed in each order the model stage offers (block_influence, angular, last_layers), up to
half the layers. Then the count `auto` picks at several budgets. Results go to
bench/results/prune_damage-NAME.{md,json}. Never run by the test suite.

    .venv/bin/python -m bench.prune_damage --model /tmp/real/smollm2 --domain api_qa
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from damoc.lm.arch import adapter_for
from damoc.lm.load import load_causal_lm, pad_id
from damoc.model.compress import answer_bits_per_byte, calibration_examples, largest_within, order_removed
from damoc.model.prune import layers_removed, n_to_remove
from damoc.model.scores import batches, calibrate
from damoc.spec import ModelSpec

OUT = Path(__file__).resolve().parent / "results"
ORDERS = ("block_influence", "angular", "last_layers")
BUDGETS = (0.05, 0.1, 0.2, 0.3)


def domain_rows(name: str) -> tuple[list[dict], list[dict]]:
    """(calibration rows, held-out rows) of one of the zoo's domains, built from this machine's files."""
    from damoc.zoo import corpus

    rows = {"api_qa": corpus.api_qa_rows, "general_qa": corpus.general_qa_rows,
            "reading": corpus.reading_comprehension_rows, "lookup_qa": corpus.lookup_qa_rows}[name]()
    train, held = corpus.split_rows(rows, 0.3, seed=0)
    return train, held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--domain", default="api_qa")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--from-log", help="write the results from the curve lines an earlier run printed (one cut "
                                       "short before it wrote them), without measuring again")
    a = ap.parse_args()
    if a.from_log:
        return from_log(a)
    torch.set_num_threads(2)
    name = Path(a.model).name
    tok, model = load_causal_lm(a.model, dtype=torch.float32)
    model.eval()
    train, held = domain_rows(a.domain)
    cal_ex = calibration_examples(tok, train[:a.rows], "qa", "auto", a.max_length)
    held_ex = calibration_examples(tok, held[:a.rows], "qa", "auto", a.max_length)
    pad = pad_id(tok)
    layers = adapter_for(model.config).num_layers(model.config)
    t0 = time.perf_counter()
    cal = calibrate(model, adapter_for(model.config), batches(cal_ex, 8, pad))
    score_s = time.perf_counter() - t0
    top = n_to_remove(layers, 0.5, True)
    curves: dict[str, list[dict]] = {}
    for order in ORDERS:
        m = ModelSpec(score=order)
        curves[order] = []
        for n in range(top + 1):
            removed = order_removed(cal, m, layers, n)
            with layers_removed(model, removed):
                curves[order].append({"n": n, "removed": removed,
                                      "calibration": answer_bits_per_byte(model, cal_ex, pad, 8),
                                      "held_out": answer_bits_per_byte(model, held_ex, pad, 8)})
            print(f"{order:16s} n={n:2d} cal {curves[order][-1]['calibration']:.3f} "
                  f"held {curves[order][-1]['held_out']:.3f}", flush=True)
    record = {"model": name, "domain": a.domain, "layers": layers, "rows": len(cal_ex), "held_out": len(held_ex),
              "score_seconds": round(score_s, 2), "curves": curves}
    write_results(record, top)


def from_log(a: argparse.Namespace) -> None:
    """The record from the lines `main` prints as it measures ('ORDER n= K cal X held Y')."""
    from transformers import AutoConfig

    curves: dict[str, list[dict]] = {o: [] for o in ORDERS}
    for m in re.finditer(r"^(\w+)\s+n=\s*(\d+) cal ([\d.]+) held ([\d.]+)", Path(a.from_log).read_text(), re.M):
        curves[m[1]].append({"n": int(m[2]), "removed": None, "calibration": float(m[3]), "held_out": float(m[4])})
    config = AutoConfig.from_pretrained(a.model)
    layers = adapter_for(config).num_layers(config)
    write_results({"model": Path(a.model).name, "domain": a.domain, "layers": layers, "rows": a.rows,
                   "held_out": a.rows, "score_seconds": None, "curves": curves, "from_log": a.from_log},
                  n_to_remove(layers, 0.5, True))


def auto_picks(curves: dict[str, list[dict]], top: int) -> dict[str, dict]:
    """Where the model stage's search (largest_within) stops at each budget, its probes read off the
    measured curves (the same forward passes: nothing to run again), beside the largest count within
    the budget anywhere on the curve."""
    picks = {}
    for order, curve in curves.items():
        base = curve[0]["calibration"]
        for budget in BUDGETS:
            n, trace = largest_within(lambda k, c=curve: c[k]["calibration"], top, budget)
            best = max(k for k, pt in enumerate(curve[:top + 1]) if pt["calibration"] <= base * (1 + budget))
            picks[f"{order}@{budget}"] = {"removed": n, "relative": (trace[n] - base) / base,
                                          "probes": len(trace), "largest_within": best}
    return picks


def write_results(record: dict, top: int) -> None:
    curves, name, layers = record["curves"], record["model"], record["layers"]
    picks = record["auto"] = auto_picks(curves, top)
    OUT.mkdir(exist_ok=True)
    (OUT / f"prune_damage-{name}.json").write_text(json.dumps(record, indent=1))
    base = curves[ORDERS[0]][0]
    lines = [f"# Pruning damage on {name} ({layers} layers), domain {record['domain']}",
             "", f"Answer loss in bits per byte; calibration: {record['rows']} training rows (what `prune_ratio: auto` "
             f"bounds), held-out: {record['held_out']} rows of the same domain. Unpruned: {base['calibration']:.3f} / "
             f"{base['held_out']:.3f}. No fine-tuning after pruning.", "",
             "| layers removed | " + " | ".join(f"{o} cal / held" for o in ORDERS) + " |",
             "|---|" + "---|" * len(ORDERS)]
    for n in range(top + 1):
        lines.append(f"| {n} | " + " | ".join(f"{curves[o][n]['calibration']:.3f} / {curves[o][n]['held_out']:.3f}"
                                               for o in ORDERS) + " |")
    lines += ["", "`prune_ratio: auto`: layers removed (relative damage, probes; the largest count within the budget "
                  "anywhere on the curve, which a search assuming the damage grows with the count can miss) at "
                  "each `max_damage`:", "",
              "| order | " + " | ".join(f"{b:g}" for b in BUDGETS) + " |", "|---|" + "---|" * len(BUDGETS)]
    for o in ORDERS:
        lines.append(f"| {o} | " + " | ".join(
            f"{picks[f'{o}@{b}']['removed']} ({picks[f'{o}@{b}']['relative']:+.1%}, {picks[f'{o}@{b}']['probes']}; "
            f"{picks[f'{o}@{b}']['largest_within']})" for b in BUDGETS) + " |")
    (OUT / f"prune_damage-{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
