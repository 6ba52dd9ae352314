"""Write a run's report: ranking.json, report.md, report.html and their PNGs, from RUN's files only."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from damoc.report import plots
from damoc.report.ranking import build_ranking
from damoc.report.render import Block, to_html, to_markdown
from damoc.rundir import atomic_write_json, atomic_write_text, read_json


def write_report(run_dir: Path, out: Path) -> dict[str, Any]:
    """Builds everything into `out` (the report folder being written); returns ranking.json's content."""
    out.mkdir(parents=True, exist_ok=True)
    ranking = build_ranking(run_dir)
    atomic_write_json(out / "ranking.json", ranking)
    finetune = read_json(run_dir / "finetune" / "results.json") or {}
    blocks: list[Block] = [("h1", f"DaMoC report: {run_dir.name}")]
    blocks += _ranking_section(ranking, finetune, out)
    blocks += _cost_section(ranking, out)
    blocks += _models_section(run_dir, out)
    blocks += _data_section(run_dir, out)
    atomic_write_text(out / "report.md", to_markdown(blocks))
    atomic_write_text(out / "report.html", to_html(blocks, f"DaMoC report: {run_dir.name}"))
    return ranking


def ranking_table(ranking: dict[str, Any]) -> str:
    """The ranking as a plain-text table for the terminal."""
    from damoc.report.render import fmt

    head = ["rank", "candidate", "status", ranking["metric"], "steps", "worker-s", "note"]
    rows = [[fmt(c["rank"]), c["name"], c["status"], fmt(c["score"]), fmt(c["steps"]), fmt(c["worker_seconds"]),
             (c.get("reason") or "")[:60]] for c in ranking["candidates"]]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() for r in [head, *rows])


def _ranking_section(ranking: dict[str, Any], finetune: dict[str, Any], out: Path) -> list[Block]:
    metric, rows = ranking["metric"], ranking["candidates"]
    winner = next((r for r in rows if r["rank"] == 1), None)
    better = "lower" if ranking["mode"] == "min" else "higher"
    lead = (f"Best candidate: {winner['name']} ({metric} {winner['score']:.4g}, {better} is better)."
            if winner else "No candidate produced a score.")
    blocks: list[Block] = [("h2", "Ranking"), ("p", lead),
                           ("p", f"Scheduler: {finetune.get('scheduler')} (rungs at steps {finetune.get('rungs') or '-'}"
                                 f"{', synchronised' if finetune.get('sync_rungs') else ''}); "
                                 f"{finetune.get('max_concurrent_trials')} trial(s) at once, "
                                 f"{finetune.get('num_workers')} worker(s) each, {finetune.get('method')} fine-tuning, "
                                 f"max {finetune.get('max_steps')} steps.")]
    blocks.append(("table", ["rank", "candidate", "status", metric, "steps", "worker-s", "train tokens",
                             "train FLOPs", "note"],
                   [[r["rank"], r["name"], r["status"], r["score"], r["steps"], r["worker_seconds"],
                     r["train_tokens"], r["train_flops"], r.get("reason", "")] for r in rows]))
    curves = {e["name"]: [(c["step"], c[metric]) for c in e.get("curve", []) if metric in c]
              for e in finetune.get("candidates", [])}
    stopped = {r["name"] for r in rows if r["stopped_early"]}
    if any(curves.values()):
        plots.learning_curves_png(out / "learning_curves.png", curves, stopped, metric)
        blocks.append(("img", "learning_curves.png", f"{metric} per candidate during fine-tuning"))
    return blocks


def _cost_section(ranking: dict[str, Any], out: Path) -> list[Block]:
    cost = ranking["cost"]
    stages = cost["stages"]
    rows = [[name, s["worker_seconds"], s.get("wall_seconds"), s.get("train_flops")] for name, s in stages.items()]
    rows.append(["total", cost["worker_seconds"], None, cost["train_flops"]])
    plots.bars_png(out / "cost.png", list(stages), [s["worker_seconds"] for s in stages.values()],
                   "Cost per stage", "worker-seconds")
    return [("h2", "Cost"),
            ("p", "Worker-seconds are what the cluster was held for (fixed framework overheads included); "
                  "training FLOPs = 6 x forward parameters x tokens processed."),
            ("table", ["stage", "worker-seconds", "wall seconds", "train FLOPs"], rows),
            ("img", "cost.png", "worker-seconds per stage")]


def _models_section(run_dir: Path, out: Path) -> list[Block]:
    index = read_json(run_dir / "models" / "models.json") or {}
    if not index.get("enabled", True):
        return [("h2", "Model compression"), ("p", "Off: the candidates were fine-tuned as they are.")]
    rows, blocks = [], [("h2", "Model compression")]
    for e in index.get("candidates", []):
        c = read_json(run_dir / "models" / e["name"] / "compression.json") or {}
        if e["status"] != "compressed":
            rows.append([e["name"], e["status"], None, None, None, None, None, e.get("reason", "")])
            continue
        cal = c.get("calibration_loss", {})
        rows.append([e["name"], e["status"], f"{c.get('layers_before')} -> {c.get('layers_after')}",
                     c.get("params_after", 0) / max(1, c.get("params_before", 1)), cal.get("original"),
                     cal.get("pruned"), cal.get("merged"), f"removed {c.get('removed')}"])
        png = run_dir / "models" / e["name"] / "layer_scores.png"
        if png.is_file():
            shutil.copyfile(png, out / f"layers_{e['name']}.png")
    blocks.append(("table", ["candidate", "status", "layers", "params kept", "calib. loss original",
                             "pruned", "merged", "note"], rows))
    blocks += [("img", f"layers_{e['name']}.png", f"{e['name']}: layer scores (red: removed)")
               for e in index.get("candidates", []) if (out / f"layers_{e['name']}.png").is_file()]
    return blocks


def _data_section(run_dir: Path, out: Path) -> list[Block]:
    m = read_json(run_dir / "data" / "manifest.json")
    if not m:
        return []
    dropped = m.get("dropped", {})
    labels = ["input", "quarantined", *[f"dropped: {k}" for k in dropped], "kept"]
    values = [m["input"], m["quarantined"], *dropped.values(), m["kept"]]
    plots.bars_png(out / "data_funnel.png", labels, values, "Where the rows went", "rows")
    ratio = m["tokens_after"] / m["tokens_before"] if m.get("tokens_before") else None
    return [("h2", "Data compression"),
            ("p", f"{m['input']:,d} rows read, {m['kept']:,d} kept for training, {m['quarantined']:,d} quarantined; "
                  f"prompt tokens {m.get('tokens_before', 0):,d} -> {m.get('tokens_after', 0):,d}"
                  + (f" ({ratio:.2f}x)." if ratio else ".")),
            ("table", ["operator", "in", "out", "seconds"],
             [[o["name"], o.get("in"), o.get("out"), o.get("seconds")] for o in m.get("operators", [])]),
            ("img", "data_funnel.png", "rows read, quarantined, dropped per reason, kept")]
