"""Selection fidelity on real pretrained LLMs: DaMoC with its defaults against full fine-tuning.

Candidates: real LLMs available offline as PyPI wheels (damoc/zoo/real.py): SmolLM2-135M-Instruct
(Llama, 30 layers, 49k vocabulary, chat template) and Gemma 3 270M (18 layers, 262k vocabulary, base
model), converted from GGUF to safetensors folders once (cached under --work). Domain: a few hundred QA
rows, by default Perl's diagnostics (perldiag.pod: message -> explanation; no candidate was tuned on
it), or one of the zoo's domains built from this machine's Python.

Runs, on one embedded Ray cluster:
  1. DaMoC with the spec's defaults (hybrid 0.2, compression 0.6, prune_ratio auto, merge none, grace
     auto, template auto), LoRA, 1 worker per trial;
  2. the full fine-tuning reference (bench/selection.py's reference_spec: no filter, no compression,
     no model stage, no early stopping), same epochs over all the rows.
Writes bench/results/real_selection.{md,json}: top-1, Kendall tau and RelAcc of DaMoC and of the
zero-shot baseline against the reference, layers kept and the damage per candidate, stage seconds,
cost ratios, and each trial's memory (estimate, request, peak). Never run by the test suite.

    .venv/bin/python -m bench.real_selection --work /tmp/damoc-real
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import time
from pathlib import Path

from selection import (REPO, agreement, costs, final_scores, measured_saving, plan_vs_report, reference_spec, run,
                       zero_shot)

from damoc.report.compare import compare_runs, load_ranking

log = logging.getLogger("bench.real_selection")
PERLDIAG = "/usr/share/perl/5.36/pod/perldiag.pod"
MODELS = ("smollm2-135m-instruct", "gemma3-270m")


def perldiag_rows(path: str = PERLDIAG) -> list[dict[str, str]]:
    """Perl's diagnostics as QA rows: the message (its =item line) -> the first paragraph explaining it."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    rows = []
    for block in re.split(r"^=item ", text, flags=re.M)[1:]:
        head, _, body = block.partition("\n")
        para = next((p for p in re.split(r"\n\s*\n", body) if p.strip() and not p.startswith("=")), "")
        answer = re.sub(r"[CLIBF]<([^<>]*)>", r"\1", " ".join(para.split()))
        if 40 <= len(answer) <= 600 and head.strip():
            rows.append({"instruction": f'What does the Perl diagnostic "{head.strip()}" mean?', "input": "",
                         "output": answer})
    return rows


def domain_files(domain: str, work: Path, rows: int, eval_rows: int, seed: int) -> tuple[Path, Path]:
    """train.jsonl and eval.jsonl of `rows` + `eval_rows` rows of the domain, drawn with the seed."""
    if domain == "perldiag":
        every = perldiag_rows()
    else:
        from damoc.zoo import corpus

        every = {"api_qa": corpus.api_qa_rows, "general_qa": corpus.general_qa_rows}[domain]()
    random.Random(seed).shuffle(every)
    if len(every) < rows + eval_rows:
        raise SystemExit(f"{domain} has {len(every)} rows; asked for {rows} + {eval_rows}")
    out = work / "data" / domain
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", every[:rows]), ("eval", every[rows:rows + eval_rows])):
        text, path = "".join(json.dumps(r) + "\n" for r in part), out / f"{name}.jsonl"
        if not path.exists() or path.read_text(encoding="utf-8") != text:  # a rewrite would look like new data
            path.write_text(text, encoding="utf-8")
    return out / "train.jsonl", out / "eval.jsonl"


def same_rows(run_dir: Path, train: Path, eval_: Path) -> bool:
    """Whether a finished run trained and evaluated on exactly the rows of these files (a reference kept
    from an earlier data file would be compared with DaMoC on other rows)."""
    import pyarrow.parquet as pq

    for part, path in (("train", train), ("eval", eval_)):
        ran = pq.read_table(run_dir / "data" / f"{part}.parquet", columns=["instruction", "output"]).to_pylist()
        now = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
        if [(r["instruction"], r["output"]) for r in ran] != [(r["instruction"], r["output"]) for r in now]:
            log.info("the reference run in %s used other %s rows: running it again", run_dir, part)
            return False
    return True


def real_models(work: Path, names: list[str]) -> dict[str, Path]:
    from damoc.zoo.real import fetch_model

    out = {}
    for name in names:
        folder = work / "models" / name
        if not (folder / "config.json").exists():
            log.info("converting %s (once)", name)
            fetch_model(name, folder)
        out[name] = folder
    return out


def damoc_spec(a: argparse.Namespace, models: dict[str, Path], train: Path, eval_: Path) -> dict:
    """The user's spec: data, candidates, LoRA on one worker, and nothing else (the defaults decide)."""
    return {"name": f"real-{a.domain}-damoc", "output_dir": str(Path(a.work) / "runs" / "damoc"), "seed": a.seed,
            "data": {"train": {"path": str(train)}, "eval": {"path": str(eval_)}},
            "candidates": [{"name": n, "path": str(p)} for n, p in models.items()],
            "finetune": {"num_workers": 1, "epochs": a.epochs, "max_steps": 100_000, "batch_size": 8,
                         "max_length": a.max_length, "eval_max_rows": a.eval_rows, "eval_every": 100_000},
            "select": {"metric": "eval_loss"}}


def trial_memory(run_dir: Path) -> dict[str, dict]:
    results = json.loads((run_dir / "finetune" / "results.json").read_text())
    return {e["name"]: {**(e.get("memory") or {}), "status": e["status"], "steps": e["steps"]}
            for e in results["candidates"]}


def compression(run_dir: Path) -> dict[str, dict]:
    out = {}
    for p in sorted((run_dir / "models").glob("*/compression.json")):
        c = json.loads(p.read_text())
        out[c["name"]] = {"layers": f"{c['layers_before']} -> {c['layers_after']}", "removed": c["removed"],
                          "damage": c.get("damage"), "seconds": c["seconds"]}
    return out


def reference_rule(run_dir: Path) -> str:
    """Who scored the rows in the data stage, from its manifest."""
    ref = json.loads((run_dir / "data" / "manifest.json").read_text()).get("reference_lm") or {}
    models = ", ".join(f"{n} {v['rows']} rows" for n, v in (ref.get("models") or {}).items())
    return f"{ref.get('rule', 'smallest')}: {models}" if models else "smallest candidate"


def curves(run_dir: Path) -> dict[str, list[list[float]]]:
    """Each candidate's DaMoC eval curve: (step, eval_loss)."""
    results = json.loads((run_dir / "finetune" / "results.json").read_text())
    return {e["name"]: [[p["step"], round(p["eval_loss"], 4)] for p in e.get("curve") or []]
            for e in results["candidates"]}


def stage_seconds(run_dir: Path) -> dict[str, float]:
    return {s: round(json.loads((run_dir / s / "_stage.json").read_text()).get("seconds", 0.0), 1)
            for s in ("data", "models", "finetune", "report") if (run_dir / s / "_stage.json").exists()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/damoc-real")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--domain", default="perldiag", choices=["perldiag", "api_qa", "general_qa"])
    ap.add_argument("--rows", type=int, default=240)
    ap.add_argument("--eval-rows", type=int, default=80)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--reuse-reference", action="store_true",
                    help="keep a finished reference run in --work as it is (it is the slow part) and rerun DaMoC only")
    ap.add_argument("--report-only", action="store_true", help="write the tables from the runs in --work")
    ap.add_argument("--reference-model", choices=list(MODELS), default=None,
                    help="the data stage's reference LM (default: as --reference-lm says)")
    ap.add_argument("--reference-lm", choices=["shared", "smallest"], default=None,
                    help="data.reference_lm without a reference model (default: the spec's, shared)")
    ap.add_argument("--no-scheduler", action="store_true",
                    help="DaMoC trains every candidate to the end (tune.scheduler none): to compare data choices")
    ap.add_argument("--tag", default="", help="suffix of the result files and DaMoC's run folder")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = Path(a.work)
    models = real_models(work, a.models)
    train, eval_ = domain_files(a.domain, work, a.rows, a.eval_rows, a.seed)
    spec = damoc_spec(a, models, train, eval_)
    if a.reference_model:
        spec["data"]["reference_model"] = str(models[a.reference_model])
    if a.reference_lm:
        spec["data"]["reference_lm"] = a.reference_lm
    if a.no_scheduler:
        spec["tune"] = {"scheduler": "none"}
    spec["output_dir"] += a.tag
    ref = reference_spec(spec, work / "runs" / "full", a.rows)

    walls = {}
    if not a.report_only:
        from damoc.runtime import connect

        runtime = connect(None, num_cpus=a.cpus)
        kept = a.reuse_reference and (Path(ref["output_dir"]) / "report" / "ranking.json").exists() \
            and same_rows(Path(ref["output_dir"]), train, eval_)
        for s in (spec,) if kept else (spec, ref):
            t0 = time.monotonic()
            run(s, runtime)  # stages found current count the seconds they took when they ran
            walls[s["name"]] = round(max(time.monotonic() - t0, sum(stage_seconds(Path(s["output_dir"])).values())), 1)
    d_run, f_run = Path(spec["output_dir"]), Path(ref["output_dir"])
    truth = final_scores(f_run)
    zs, _ = zero_shot(d_run)
    cmp = compare_runs(d_run, f_run)  # DaMoC's ranks: a decided winner ranks first whatever its last figure
    picks = {"DaMoC": {"pick": cmp["choice_a"], "top1_hit": cmp["top1_hit"], "kendall_tau": cmp["kendall_tau"],
                       "rel_acc": cmp["rel_acc"]},
             "zero-shot": agreement(zs, truth) if len(zs) > 1 else None}
    d_cost, f_cost = costs(d_run), costs(f_run)
    record = {"domain": a.domain, "rows": a.rows, "eval_rows": a.eval_rows, "epochs": a.epochs,
              "reference": truth, "damoc": final_scores(d_run), "zero_shot": zs, "agreement": picks,
              "compression": compression(d_run), "stages": {"damoc": stage_seconds(d_run), "full": stage_seconds(f_run)},
              "wall_seconds": walls, "cost": {"damoc": d_cost, "full": f_cost},
              "ratio": {k: (f_cost[k] / d_cost[k] if d_cost[k] else None) for k in d_cost},
              "memory": {"damoc": trial_memory(d_run), "full": trial_memory(f_run)},
              "decided_at": load_ranking(d_run).get("decided_at"), "plan": {**plan_vs_report(spec, d_run), "measured_saving": measured_saving(f_run, d_run)},
              "reference_model": a.reference_model or reference_rule(d_run),
              "damoc_curves": curves(d_run)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"real_selection{a.tag}.json").write_text(json.dumps(record, indent=1, default=str))
    (out / f"real_selection{a.tag}.md").write_text(render(record))
    print(render(record))


def render(r: dict) -> str:
    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    names = sorted(r["reference"] or r["damoc"])
    lines = [f"# DaMoC on real LLMs: {r['domain']} ({r['rows']} training rows, {r['eval_rows']} eval rows, "
             f"{r['epochs']:g} epoch)", "",
             "Eval answer loss in bits per byte (lower is better). DaMoC: the spec's defaults, its figure where "
             "its trial ended (ranked by the run's ranks: a decided winner first); reference: full fine-tuning of "
             "the unpruned models on every row.", "",
             "| candidate | reference (full FT) | DaMoC (compressed, short) | zero-shot (original) | layers | "
             "calibration damage | trial memory estimate / peak (DaMoC; full) |",
             "|---|---|---|---|---|---|---|"]
    for n in names:
        c, md, mf = r["compression"].get(n, {}), r["memory"]["damoc"].get(n, {}), r["memory"]["full"].get(n, {})
        dmg = (c.get("damage") or {}).get("relative")
        lines.append(f"| {n} | {f(r['reference'].get(n))} | {f(r['damoc'].get(n))} | {f(r['zero_shot'].get(n))} | "
                     f"{c.get('layers', '-')} | {f(dmg, '{:+.1%}')} | "
                     f"{f(md.get('estimate_gib'), '{:.2f}')} / {f(md.get('peak_gib'), '{:.2f}')} GiB; "
                     f"{f(mf.get('estimate_gib'), '{:.2f}')} / {f(mf.get('peak_gib'), '{:.2f}')} GiB |")
    lines += ["", "| selector | pick | top-1 | Kendall tau | RelAcc |", "|---|---|---|---|---|"]
    for k, v in r["agreement"].items():
        if v:
            lines.append(f"| {k} | {v['pick']} | {'yes' if v['top1_hit'] else 'no'} | {v['kendall_tau']:+.2f} | "
                         f"{f(v['rel_acc'], '{:.2f}')} |")
    ratio = r["ratio"]
    lines += ["", f"Cost, full / DaMoC: {f(ratio.get('total_ws'), '{:.1f}x')} in worker-seconds end to end, "
                  f"{f(ratio.get('train_ws'), '{:.1f}x')} in training worker-seconds, "
                  f"{f(ratio.get('flops'), '{:.1f}x')} in training FLOPs. Wall: {r['wall_seconds']}. "
                  f"Decided at step {r['decided_at']}.",
              f"Stage seconds: DaMoC {r['stages']['damoc']}, full {r['stages']['full']}. "
              f"Reference LM of the data stage: {r.get('reference_model', '-')}."]
    if r.get("plan"):
        p = r["plan"]
        lines += ["", "`damoc plan` before the run against the run's report (worker-seconds):", "",
                  "| | saving in CPU-hours | data | models | finetune | full fine-tuning |", "|---|---|---|---|---|---|",
                  f"| plan | {f(p['projected_saving'], '{:.2f}x')} | " + " | ".join(
                      f(p["projected_stages"].get(k), "{:.0f}") for k in ("data", "models", "finetune"))
                  + f" | {f(p['projected_full_seconds'], '{:.0f}')} |",
                  f"| report | {f(p['report_saving'], '{:.2f}x')} | " + " | ".join(
                      f(p["measured_stages"].get(k), "{:.0f}") for k in ("data", "models", "finetune"))
                  + f" | {f(p['report_full_seconds'], '{:.0f}')} |"]
        if p.get("measured_saving"):
            lines += ["", f"Measured: the reference's training and start-up over DaMoC's worker-seconds, "
                          f"{p['measured_saving']:.2f}x (what both projections estimate; the reference's evaluations "
                          "are left out, as they leave them out)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
