"""The CPU floor of DaMoC's forward passes on real LLMs: each pass against a plain batched loop.

For each model, over the same rows of a domain, in one process with the same torch threads:
  - data stage: the reference-LM scorer (`damoc.data.lm.LMScorer`, compression on, as the stage's
    actor runs it: the prompt+answer pass and IFD's answer-alone pass) against a plain loop
    `model(input_ids, attention_mask)` under `torch.no_grad` over the same token sequences, in
    batches of 8 rows, longest first;
  - model stage: the calibration pass (`calibrate`: layer scores, the calibration loss and the
    answer loss in one forward) and one damage probe (`answer_bits_per_byte` with a layer taken
    out) against the same plain loop over the calibration sequences; and the whole candidate
    (`compress_candidate`), with how many passes it made.
Prints rows/s of each and the ratio plain / ours (>= 1 means ours is at or under the floor), and
writes bench/results/cpu_floor.{md,json}. Never run by the test suite.

    .venv/bin/python -m bench.cpu_floor --work /tmp/damoc-real --threads 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results"
PLAIN_BATCH = 8  # rows per batch of the plain loop: 64 rows of a 262k vocabulary's logits are ~10 GB


def plain_loop(model, seqs: list[list[int]], batch: int, pad: int) -> float:
    """Seconds of a plain batched no-grad forward over the sequences (longest first, right-padded), the
    model's logits at every position as `model(...)` gives them."""
    seqs = sorted(seqs, key=len, reverse=True)
    data = []
    for s in range(0, len(seqs), batch):
        chunk = seqs[s:s + batch]
        ids = torch.full((len(chunk), len(chunk[0])), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, c in enumerate(chunk):
            ids[i, :len(c)], mask[i, :len(c)] = torch.tensor(c), 1
        data.append((ids, mask))
    t0 = time.perf_counter()
    with torch.no_grad():
        for ids, mask in data:
            model(input_ids=ids, attention_mask=mask)
    return time.perf_counter() - t0


def timed(fn, repeat: int) -> float:
    """The best of `repeat` runs, in seconds (the machine is shared: the best is the least disturbed)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def data_pass(path: Path, rows: list[dict], batch: int, repeat: int) -> dict:
    from damoc.data.lm import CompressArgs, LMScorer
    from damoc.lm.tokens import encode

    scorer = LMScorer(str(path), max_length=256, compress=CompressArgs(0.6))
    cols = {k: [r[k] for r in rows] for k in ("instruction", "input", "output")}

    def ours():
        for s in range(0, len(rows), batch):
            scorer({k: v[s:s + batch] for k, v in cols.items()})

    prompts = scorer.prompts(cols["instruction"], cols["input"])
    seqs = [encode(scorer.tok, p.text, a, 256).ids for p, a in zip(prompts, cols["output"])] + \
           [encode(scorer.tok, "", a, 256).ids for a in cols["output"]]
    ours()  # warm-up: the head check, allocator
    t_ours = timed(ours, repeat)
    t_plain = min(plain_loop(scorer.model, seqs, PLAIN_BATCH, scorer.pad) for _ in range(repeat))
    return {"rows": len(rows), "sequences": len(seqs), "tokens": sum(map(len, seqs)), "ours_s": t_ours,
            "plain_s": t_plain}


def model_passes(path: Path, rows: list[dict], repeat: int) -> dict:
    from damoc.lm.arch import adapter_for
    from damoc.lm.load import load_causal_lm, pad_id
    from damoc.model.compress import answer_bits_per_byte, calibration_examples
    from damoc.model.prune import layers_removed
    from damoc.model.scores import batches, calibrate
    from damoc.spec import ModelSpec

    m = ModelSpec()
    tok, model = load_causal_lm(str(path))
    examples = calibration_examples(tok, rows[:m.calibration.rows], "qa", "auto", m.calibration.max_length)
    data = batches(examples, m.calibration.batch_size, pad_id(tok))
    adapter = adapter_for(model.config)
    middle = adapter.num_layers(model.config) // 2

    def probe():
        with layers_removed(model, [middle]):
            answer_bits_per_byte(model, examples, pad_id(tok), m.calibration.batch_size)

    calibrate(model, adapter, data)
    t_cal = timed(lambda: calibrate(model, adapter, data), repeat)
    t_probe = timed(probe, repeat)
    t_plain = min(plain_loop(model, [e.ids for e in examples], m.calibration.batch_size, pad_id(tok))
                  for _ in range(repeat))
    with layers_removed(model, [middle]):
        t_plain_probe = min(plain_loop(model, [e.ids for e in examples], m.calibration.batch_size, pad_id(tok))
                            for _ in range(repeat))
    return {"rows": len(examples), "tokens": sum(len(e.ids) for e in examples), "calibrate_s": t_cal,
            "plain_s": t_plain, "probe_s": t_probe, "plain_probe_s": t_plain_probe}


def whole_candidate(path: Path, rows: list[dict], eval_rows: list[dict]) -> dict:
    from damoc.model.compress import Source, compress_candidate
    from damoc.spec import ModelSpec

    with tempfile.TemporaryDirectory() as tmp:
        r = compress_candidate(Source(path.name, str(path)), rows[:64], ModelSpec(), Path(tmp) / "out",
                               eval_rows=eval_rows, max_length=192, score_compressed=False)
    return {"seconds": r["seconds"], "by_step": r["seconds_by_step"], "probes": len(r["damage"]["probes"]),
            "passes": r.get("passes"), "layers": f"{r['layers_before']} -> {r['layers_after']}"}


PASSES = (("data", "ours_s", "plain_s", "data: reference LM (prompt+answer, answer alone, compression)"),
          ("model", "calibrate_s", "plain_s", "model: calibration (scores, loss, answer loss)"),
          ("model", "probe_s", "plain_probe_s", "model: one damage probe"))


def write(res: dict, out: Path, before: dict | None = None) -> str:
    """The tables; `before`: the same bench's JSON from an earlier commit, shown beside (ratio and seconds)."""
    was = (before or {}).get("models", {})
    lines = [f"# DaMoC's forward passes against a plain batched no-grad loop ({res['threads']} torch thread(s), "
             f"{res['domain']})", "",
             "Slowdown = ours / plain seconds over the same sequences: 1.00 is the floor (the plain loop "
             "computes the logits of every position and nothing else). Best of the runs; the machine is shared.",
             "", "| model | pass | rows | ours s | plain s | rows/s ours | slowdown ours/plain |"
             + (f" before ({before.get('commit', 'earlier')}): ours s, slowdown |" if before else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if before else "")]
    for name, r in res["models"].items():
        for part, ours, plain, label in PASSES:
            x, b = r[part], (was.get(name) or {}).get(part)
            lines.append(f"| {name} | {label} | {x['rows']} | {x[ours]:.2f} | {x[plain]:.2f} | "
                         f"{x['rows'] / x[ours]:.1f} | {x[ours] / x[plain]:.2f} |"
                         + (f" {b[ours]:.2f}, {b[ours] / b[plain]:.2f} |" if b else (" - |" if before else "")))
    lines += ["", "## The whole candidate in the model stage (64 calibration rows, 80 eval rows)", "",
              "| model | seconds | layers | damage probes | passes over the calibration rows | by step |"
              + (" before: seconds, probes |" if before else ""), "|---|---|---|---|---|---|" + ("---|" if before else "")]
    for name, r in res["models"].items():
        w, b = r["candidate"], ((was.get(name) or {}).get("candidate"))
        lines.append(f"| {name} | {w['seconds']:.1f} | {w['layers']} | {w['probes'] - 1} | {w['passes']} | "
                     f"{', '.join(f'{k} {v:.1f}' for k, v in w['by_step'].items())} |"
                     + (f" {b['seconds']:.1f}, {b['probes'] - 1} |" if b else (" - |" if before else "")))
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_floor.md").write_text(text)
    (out / "cpu_floor.json").write_text(json.dumps(res, indent=1))
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/damoc-real", help="where bench/real_selection.py keeps models and data")
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    ap.add_argument("--domain", default="perldiag")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64, help="rows per batch, as the data stage's data.batch_size")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a 1-CPU Ray actor runs one)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--before", help="this bench's JSON from an earlier commit, to show beside")
    ap.add_argument("--render", help="write the tables from this JSON (a finished run) without running")
    a = ap.parse_args()
    before = json.loads(Path(a.before).read_text()) if a.before else None
    if a.render:
        print(write(json.loads(Path(a.render).read_text()), Path(a.out), before))
        return
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    rows = [json.loads(x) for x in (work / "data" / a.domain / "train.jsonl").read_text().splitlines()][:a.rows]
    eval_rows = [json.loads(x) for x in (work / "data" / a.domain / "eval.jsonl").read_text().splitlines()]
    res = {"threads": a.threads, "domain": a.domain, "models": {}}
    for name in a.models:
        path = work / "models" / name
        res["models"][name] = {"data": data_pass(path, rows, a.batch, a.repeat),
                               "model": model_passes(path, rows, a.repeat),
                               "candidate": whole_candidate(path, rows, eval_rows)}
        print(json.dumps({name: res["models"][name]}), flush=True)
    print(write(res, Path(a.out), before))


if __name__ == "__main__":
    main()
