"""Write a run's report: ranking.json, report.md, report.html and their PNGs, from RUN's files only."""

from __future__ import annotations

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
    blocks += _timeline_section(finetune, out)
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
    if ranking.get("decided_at") is not None:
        lead += (f" Decided at step {ranking['decided_at']}: ASHA had stopped every other candidate there, so "
                 f"{winner['name']} ranks first whatever it does next; it was stopped at that step "
                 "(tune.finish_winner: true trains it to the end).")
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


def _timeline_section(finetune: dict[str, Any], out: Path) -> list[Block]:
    """Where each trial's seconds went (damoc/train/timeline.py), one row and one bar per trial."""
    entries = [e for e in finetune.get("candidates", []) if e.get("timeline")]
    if not entries:
        return []
    groups = {"fixed start-up": "fixed", "training": "training", "evaluation": "evaluation",
              "checkpointing": "checkpointing", "idle at rungs": "rung_wait"}
    per = {e["name"]: {g: e["timeline"].get(p, 0.0) for g, p in groups.items()} for e in entries}
    plots.stacked_bars_png(out / "timeline.png", per, "Where each trial's seconds went", "seconds")
    rows = [[e["name"], e["timeline"].get("waiting_for_resources"), *per[e["name"]].values(), e["timeline"].get("total"),
             e.get("workers")] for e in entries]
    idle = sum(e["timeline"].get("rung_wait", 0.0) * (e.get("workers") or 1) for e in entries)
    return [("h2", "Trial timelines"),
            ("p", "Seconds per phase of each trial. Fixed start-up: the trial actor, the worker group, imports, "
                  f"model load, engine init, data ready and teardown. Idle at rungs: {idle:.1f} worker-seconds "
                  "in all, workers held while a trial waited for the others at a synchronised rung."),
            ("table", ["candidate", "queued", *groups, "total", "workers"], rows),
            ("img", "timeline.png", "seconds per phase of each trial")]


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
        if c.get("scores"):
            score = str(c.get("score", "score")).replace("_", " ")
            plots.layer_scores_png(out / f"layers_{e['name']}.png", c["scores"], c.get("removed", []),
                                   f"{e['name']}: {score} per layer", score, c.get("protected", []))
    blocks.append(("table", ["candidate", "status", "layers", "params kept", "calib. loss original",
                             "pruned", "merged", "note"], rows))
    blocks += [("img", f"layers_{e['name']}.png", f"{e['name']}: layer scores (red: removed; hatched: protected)")
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
