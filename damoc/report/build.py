"""Write a run's report: ranking.json, report.md, report.html and their PNGs, from RUN's files only."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from damoc.report.savings import cost_words
from damoc.report import plots
from damoc.report.ranking import build_ranking
from damoc.report.reasons import describe
from damoc.report.render import Block, fmt, to_html, to_markdown
from damoc.report.savings import savings
from damoc import records
from damoc.rundir import atomic_write_text


def write_report(run_dir: Path, out: Path) -> dict[str, Any]:
    """Builds everything into `out` (the report folder being written); returns ranking.json's content."""
    out.mkdir(parents=True, exist_ok=True)
    ranking = build_ranking(run_dir)
    ranking["savings"] = savings(run_dir, ranking)
    records.write(records.Ranking, out / "ranking.json", ranking)
    finetune = records.read(records.Results, run_dir) or {}
    blocks: list[Block] = [("h1", f"DaMoC report: {run_dir.name}")]
    blocks += _summary_section(run_dir, ranking)
    blocks += _ranking_section(ranking, finetune, out)
    blocks += _zero_shot_section(ranking)
    blocks += _handoff_section(run_dir, ranking)
    blocks += _timeline_section(finetune, out)
    blocks += _cost_section(ranking, out)
    blocks += _models_section(run_dir, out)
    blocks += _data_section(run_dir, out)
    atomic_write_text(out / "report.md", to_markdown(blocks))
    atomic_write_text(out / "report.html", to_html(blocks, f"DaMoC report: {run_dir.name}", out))
    return ranking


def _interval(c: dict[str, Any]) -> str:
    iv = c.get("interval")
    return "-" if not iv else f"{fmt(iv[0])}-{fmt(iv[1])}"


def _summary_section(run_dir: Path, ranking: dict[str, Any]) -> list[Block]:
    """The first screen: the pick, how sure in words, what the run cost against fine-tuning everything, and
    the next step as code to copy."""
    pick = next((c for c in ranking["candidates"] if c["rank"] == 1), None)
    if pick is None:
        return [("p", "No candidate produced a score: see the ranking's reasons below.")]
    ranked = [c for c in ranking["candidates"] if c["rank"] is not None]
    lines = [f"Pick: {pick['name']}, of {len(ranked)} ranked candidate(s) ({ranking['metric']} "
             f"{fmt(pick['score'])}, {'lower' if ranking['mode'] == 'min' else 'higher'} is better).",
             sureness(ranking)]
    sv = ranking.get("savings") or {}
    if sv.get("ratio"):
        cost = (f"Cost: this run cost {cost_words(sv['ratio'])} than fine-tuning all {len(ranking['candidates'])} "
                f"candidates in full would ({fmt(sv['this_run'])} against ~{fmt(sv['full_projected'])} "
                f"{sv['unit']}, projected: see Cost).")
        if sv["ratio"] < 1:
            cost += (" On this little data fine-tuning everything is cheap, and DaMoC's fixed costs (the data and "
                     "model stages, each trial's start-up) outweigh the training it saves.")
        lines.append(cost)
    return [("h2", "Summary"), *[("p", ln) for ln in lines if ln],
            ("p", f"Next: load {pick['name']}'s trained adapter, or fine-tune the original {pick['name']} in full "
                  "(the same job with data selection, compression, the model stage and early stopping off)."),
            *next_step_code(run_dir, pick)]


def sureness(ranking: dict[str, Any]) -> str:
    """How sure the pick is, in words a reader can follow: the paired comparison with the runner-up."""
    conf = ranking.get("confidence") or {}
    vs = conf.get("vs") or {}
    if not vs:
        return ""
    better = "lower" if ranking["mode"] == "min" else "higher"
    name, v = min(vs.items(), key=lambda kv: kv[1]["p_pick_better"])  # the closest rival
    lo, hi = v["difference"]
    where = f" at step {v['step']} (where it was last evaluated)" if v.get("step") else ""
    paired = (f"On {conf['replicates']} resamples of the {conf['rows']} eval rows, each scoring every candidate on "
              f"the same rows (so a row's own difficulty cancels out), {conf['pick']} beats every other candidate "
              f"in {conf['p_best']:.0%}.")
    if v["tied"]:
        return (f"How sure: too close to call between {conf['pick']} and {name}{where}: {name}'s {ranking['metric']} "
                f"minus {conf['pick']}'s is between {lo:+.3g} and {hi:+.3g} (95% interval), which holds 0. " + paired)
    by = f"by {min(abs(lo), abs(hi)):.3g} to {max(abs(lo), abs(hi)):.3g} (95% interval of the paired difference"
    if (lo > 0) == (ranking["mode"] == "min"):  # other - pick: above 0 is the pick ahead where lower is better
        return (f"How sure: {conf['pick']}'s {ranking['metric']} is {better} than that of the closest rival, {name}"
                f"{where}, {by}; the candidates' own intervals may overlap, the difference's does not hold 0). "
                + paired)
    return (f"How sure: not on these figures. {name}'s {ranking['metric']}{where} is {better} than {conf['pick']}'s "
            f"{by}): {conf['pick']} was ranked first for where its learning curve pointed (the trend ASHA judges "
            "by), not for its figure there" + _cut_words(ranking, name) + ". " + paired)


def _cut_words(ranking: dict[str, Any], name: str) -> str:
    """How sure the rung that stopped `name` was, in its paired terms (the share of resamples of the eval
    rows in which it fell outside the kept ones, each trial judged by its trend)."""
    entry = next((c for c in ranking.get("candidates", []) if c["name"] == name), {})
    cut = entry.get("cut_because") or {}
    if not cut:
        return ""
    step = max(cut, key=int)
    return f": the rung at step {step} stopped {name} as {cut[step]}"


def next_step_code(run_dir: Path, pick: dict[str, Any]) -> list[Block]:
    """Code to load the pick's adapter (when it has one), and the spec lines that fine-tune the original in full."""
    blocks: list[Block] = []
    adapter = (pick.get("adapter") or {}).get("path")
    if adapter:
        blocks.append(("code", "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                               f"base = \"{run_dir / 'models' / pick['name']}\"  # the compressed {pick['name']}\n"
                               "model = AutoModelForCausalLM.from_pretrained(base)\n"
                               "tokenizer = AutoTokenizer.from_pretrained(base)\n"
                               f"model = PeftModel.from_pretrained(model, \"{run_dir / 'finetune' / adapter}\")\n",
                       "python"))
    src = pick.get("source") or {}
    where = f"hf: {src['hf']}" + (f", revision: {src['revision']}" if src.get("revision") else "") if src.get("hf") \
        else f"path: {src.get('path', '...')}"
    blocks.append(("code", "# the job's spec, changed to fine-tune the original winner in full on every row\n"
                           f"candidates:\n  - {{name: {pick['name']}, {where}}}\n"
                           "data:\n  filter: {method: none}\n  compress: {enabled: false}\n"
                           "model: {enabled: false}\ntune: {scheduler: none}\n", "yaml"))
    return blocks


def ranking_table(ranking: dict[str, Any]) -> str:
    """The ranking as a plain-text table for the terminal, with the pick's confidence under it."""
    head = ["rank", "candidate", "status", ranking["metric"], "95% interval", "steps", "worker-s", "note"]
    rows = [[fmt(c["rank"]), c["name"], c["status"], fmt(c["score"]), _interval(c), fmt(c["steps"]),
             fmt(c["worker_seconds"]), note(c)] for c in ranking["candidates"]]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    return "\n".join([*lines, *([confidence_line(ranking)] if ranking.get("confidence") else [])])


def note(c: dict[str, Any], width: int = 70) -> str:
    """A candidate's reason or note for the terminal: cut at a word, never inside one (the report has it whole)."""
    text = c.get("reason") or c.get("note") or ""
    return textwrap.shorten(text, width, placeholder=" ... (whole in the report)") if len(text) > width else text


def confidence_line(ranking: dict[str, Any]) -> str:
    conf = ranking["confidence"]
    if conf["too_close"]:
        return (f"too close to call: {conf['pick']} is best in {conf['p_best']:.0%} of {conf['replicates']} paired "
                f"resamples of the {conf['rows']} eval rows; tied with {', '.join(conf['tied'])}")
    return (f"confidence: {conf['pick']} is best in {conf['p_best']:.0%} of {conf['replicates']} paired resamples "
            f"of the {conf['rows']} eval rows")


def _ranking_section(ranking: dict[str, Any], finetune: dict[str, Any], out: Path) -> list[Block]:
    metric, rows = ranking["metric"], ranking["candidates"]
    winner = next((r for r in rows if r["rank"] == 1), None)
    better = "lower" if ranking["mode"] == "min" else "higher"
    lead = (f"Best candidate: {winner['name']} ({metric} {fmt(winner['score'])}, {better} is better)."
            if winner else "No candidate produced a score.")
    if ranking.get("decided_at") is not None:
        then = ("trained on to its planned steps (tune.finish_winner)" if ranking.get("finish_winner") else
                "it was stopped at that step (tune.finish_winner: true trains it to the end)")
        lead += (f" Decided at step {ranking['decided_at']}: ASHA had stopped every other candidate there, so "
                 f"{winner['name']} ranks first whatever it does next; {then}.")
    if finetune.get("resumed"):
        entries = finetune.get("candidates", [])
        again = [e["name"] for e in entries if e.get("attempts", 1) > 1]
        lost = sum(e.get("earlier_seconds", 0.0) * e.get("workers", 1) for e in entries)
        lead += (f" The fine-tuning was resumed {finetune['resumed']} time(s) after an interruption: "
                 f"{len(entries) - len(again)} trial(s) kept as they were, {len(again)} continued from their last "
                 f"checkpoint ({', '.join(again) or '-'}); the cost includes the interrupted attempts "
                 f"({lost:.1f} worker-s).")
    blocks: list[Block] = [("h2", "Ranking"), ("p", lead)]
    if ranking.get("confidence"):
        conf = ranking["confidence"]
        blocks.append(("p", confidence_line(ranking) + ". Each candidate is compared with the pick at the step "
                       "where it was last evaluated (a candidate stopped early, at its stopping step); a difference "
                       f"whose {conf['level']:.0%} interval holds 0 is a tie."))
    blocks.append(("p", f"Scheduler: {finetune.get('scheduler')} (rungs at steps {finetune.get('rungs') or '-'}"
                        f"{', synchronised' if finetune.get('sync_rungs') else ''}); "
                        f"{finetune.get('max_concurrent_trials')} trial(s) at once, "
                        f"{finetune.get('num_workers')} worker(s) each, {finetune.get('method')} fine-tuning, "
                        f"max {finetune.get('max_steps')} steps." + grace_note(finetune.get("grace_auto"))))
    steady = steadiness_note(finetune, ranking)
    if steady:
        blocks.append(("p", steady))
    vs = (ranking.get("confidence") or {}).get("vs", {})
    blocks.append(("table", ["rank", "candidate", "status", metric, "95% interval", "at step", "p(pick better)",
                             "worker-s", "train FLOPs", "note"],
                   [[r["rank"], r["name"], r["status"], r["score"], _interval(r), r["steps"],
                     vs.get(r["name"], {}).get("p_pick_better"), r["worker_seconds"], r["train_flops"],
                     r.get("reason") or r.get("note") or ""] for r in rows]))
    curves = {e["name"]: [(c["step"], c[metric]) for c in e.get("curve", []) if metric in c]
              for e in finetune.get("candidates", [])}
    stopped = {r["name"] for r in rows if r["stopped_early"]}
    if any(curves.values()):
        plots.learning_curves_png(out / "learning_curves.png", curves, stopped, metric)
        blocks.append(("img", "learning_curves.png", f"{metric} per candidate during fine-tuning (step 0: zero-shot)"))
    return blocks


def _zero_shot_section(ranking: dict[str, Any]) -> list[Block]:
    z = ranking.get("zero_shot")
    if not z:
        return []
    rank_of = {c["name"]: c["rank"] for c in ranking["candidates"]}
    zrank = {n: i + 1 for i, n in enumerate(z["order"])}
    damoc_pick = next((c["name"] for c in ranking["candidates"] if c["rank"] == 1), None)
    verdict = zero_shot_verdict(z, damoc_pick)
    moved = [n for n in z["order"] if rank_of.get(n) is not None and rank_of[n] != zrank[n]]
    tau = "" if z.get("kendall_tau") is None else f" Kendall tau between the two rankings: {z['kendall_tau']:+.2f}."
    return [("h2", "The free baseline: zero-shot loss"),
            ("p", f"Every candidate's answer loss before any fine-tuning, on the same eval rows ({z['source']}). "
                  f"{verdict}{tau}" + (f" Ranked differently: {', '.join(moved)}." if moved else "")),
            ("table", ["candidate", "zero-shot eval_loss", "zero-shot rank", "compressed, zero-shot", "DaMoC rank"],
             [[n, z["scores"][n], zrank[n], (z.get("compressed") or {}).get(n), rank_of.get(n)] for n in z["order"]])]


def zero_shot_verdict(z: dict[str, Any], damoc_pick: str | None) -> str:
    """What the free baseline says beside this run's pick, claiming only what the run measured: a run
    that fine-tuned everything in full is the reference; a DaMoC run is not, so a disagreement is stated,
    not judged."""
    if z["agrees_on_pick"]:
        out = f"Zero-shot loss picks {z['pick']}, as this run does."
    elif z.get("full_reference"):
        out = (f"Zero-shot loss would pick {z['pick']}; full fine-tuning (this run) picks {damoc_pick}: the free "
               "guess would have been wrong here.")
    else:
        out = (f"Zero-shot loss would pick {z['pick']}; DaMoC's short fine-tuning of the compressed candidates "
               f"picks {damoc_pick}. This run cannot say which is right: a full fine-tuning reference run "
               "(`damoc compare`) can.")
    if z.get("all_below_original"):
        out += (" Every candidate ended worse than its unpruned original started: the ranking may measure how "
                "much compression hurt each model more than how well it learns the domain (lower "
                "model.max_damage, or train longer).")
    return out


def _handoff_section(run_dir: Path, ranking: dict[str, Any]) -> list[Block]:
    """Where each candidate came from, and how to load a trained adapter."""
    rows, loads = [], []
    for c in ranking["candidates"]:
        src = c.get("source") or {}
        where = f"{src['hf']}" + (f" @ {src['revision']}" if src.get("revision") else "") if src.get("hf") \
            else src.get("path")
        rows.append([c["name"], where, (c.get("adapter") or {}).get("path"), (c.get("adapter") or {}).get("step")])
        if c.get("adapter"):
            loads.append(c)
    blocks: list[Block] = [("h2", "Candidates and trained adapters"),
                           ("table", ["candidate", "source", "LoRA adapter (in RUN/finetune)", "at step"], rows)]
    for c in loads[:1]:
        blocks.append(("p", "Load the trained adapter on the compressed model with peft: "
                            "model = AutoModelForCausalLM.from_pretrained('RUN/models/{n}'); "
                            "model = PeftModel.from_pretrained(model, 'RUN/finetune/{a}') "
                            "(RUN = {r}).".format(n=c["name"], a=c["adapter"]["path"], r=run_dir)))
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
    blocks: list[Block] = [("h2", "Cost")]
    sv = ranking.get("savings")
    if sv:
        flops = sv["full_flops"] / sv["this_run_flops"] if sv.get("this_run_flops") else None
        blocks += [("p", f"This run cost {cost_words(sv.get('ratio'))} than fine-tuning every candidate in full "
                         f"would, in {sv['unit']} ({fmt(sv['this_run'])} against ~{fmt(sv['full_projected'])} "
                         f"projected), and {cost_words(flops)} in training FLOPs. Projected from "
                         + "; ".join(sv["assumptions"]) + ".")]
    return blocks + [
        ("p", "Worker-seconds are what the cluster was held for (fixed framework overheads included); "
              "training FLOPs = 6 x forward parameters x tokens processed."),
        ("table", ["stage", "worker-seconds", "wall seconds", "train FLOPs"], rows),
        ("img", "cost.png", "worker-seconds per stage")]


def _models_section(run_dir: Path, out: Path) -> list[Block]:
    index = records.read(records.ModelsIndex, run_dir) or {}
    if not index.get("enabled", True):
        return [("h2", "Model compression"), ("p", "Off: the candidates were fine-tuned as they are.")]
    rows, strips, blocks = [], [], [("h2", "Model compression")]
    for e in index.get("candidates", []):
        c = records.compression(run_dir / "models" / e["name"]) or {}
        if e["status"] != "compressed":
            rows.append([e["name"], e["status"], None, None, None, None, None, e.get("reason", "")])
            continue
        dmg = c.get("damage") or {}
        rule = (f"auto (damage at most {dmg['max_damage']:.0%})" if dmg.get("max_damage") is not None
                else f"fixed {c.get('prune_ratio')}")
        rows.append([e["name"], e["status"], f"{c.get('layers_before')} -> {c.get('layers_after')}",
                     c.get("params_after", 0) / max(1, c.get("params_before", 1)), dmg.get("original"),
                     dmg.get("pruned"), None if dmg.get("relative") is None else f"{dmg['relative']:+.1%}",
                     f"{rule}; removed {c.get('removed')}"])
        if c.get("scores"):
            strips.append((e["name"], str(c.get("score", "score")).replace("_", " "), c["scores"],
                           c.get("removed", []), c.get("protected", [])))
    blocks.append(("p", "Damage: the calibration rows' answer loss in bits per byte, unpruned and as saved; "
                        "`prune_ratio: auto` removes the most layers that keep it within `model.max_damage`."))
    blocks.append(("table", ["candidate", "status", "layers", "params kept", "answer loss original",
                             "pruned", "damage", "rule"], rows))
    if strips:
        plots.layer_scores_png(out / "layers.png", strips)
        blocks.append(("img", "layers.png", "each candidate's layer scores (red: removed; hatched: protected)"))
    return blocks


def _data_section(run_dir: Path, out: Path) -> list[Block]:
    m = records.read(records.Manifest, run_dir)
    if not m:
        return []
    dropped = m.get("dropped", {})
    labels = ["input", "quarantined", *[describe(k).split(" [")[0] for k in dropped], "kept"]
    values = [m["input"], m["quarantined"], *dropped.values(), m["kept"]]
    plots.bars_png(out / "data_funnel.png", labels, values, "Where the rows went", "rows")
    ratio = m["tokens_after"] / m["tokens_before"] if m.get("tokens_before") else None
    return [("h2", "Data compression"),
            ("p", f"{m['input']:,d} rows read, {m['kept']:,d} kept for training, {m['quarantined']:,d} quarantined; "
                  f"prompt tokens {m.get('tokens_before', 0):,d} -> {m.get('tokens_after', 0):,d}"
                  + (f" ({ratio:.2f}x)." if ratio else ".")),
            *([("p", "Warning: " + m["budget_note"])] if m.get("budget_note") else []),
            *([("p", who)] if (who := scorers_note(m)) else []),
            ("table", ["why rows were dropped", "rows"],
             [[describe(k), v] for k, v in sorted(dropped.items(), key=lambda kv: -kv[1])]),
            ("table", ["operator", "in", "out", "seconds"],
             [[o["name"], o.get("in"), o.get("out"), o.get("seconds")] for o in m.get("operators", [])]),
            ("img", "data_funnel.png", "rows read, quarantined, dropped per reason, kept"),
            *_compress_examples(m), *_rewrite_section(m), *_judge_section(run_dir, out)]


def scorers_note(m: dict[str, Any]) -> str | None:
    """Who scored the rows for selection and compression, and whether that could favour a candidate."""
    ref = m.get("reference_lm") or {}
    models = {n: v.get("rows", 0) for n, v in (ref.get("models") or {}).items()}
    if not models:
        return None
    who = ", ".join(f"{n} ({r:,d})" for n, r in models.items())
    if len(models) > 1:
        return (f"Rows scored for selection and compression by the candidates in equal shares drawn from each "
                f"row's content: {who}. Each share was selected by its own scorer, so the data favours no "
                "candidate.")
    if ref.get("rule") == "reference_model":
        return f"Rows scored for selection and compression by the reference LM {who}."
    if ref.get("rule") == "shared":
        return f"Rows scored for selection and compression by {who}, the only local candidate that loads."
    return (f"Rows scored for selection and compression by one candidate, {who}: its own judgement picked "
            "every candidate's training rows, which may favour it (data.reference_lm: shared avoids that).")


def _fields(row: dict[str, str]) -> str:
    return " / ".join(v for v in (row.get("instruction"), row.get("input"), row.get("output")) if v)


def _compress_examples(m: dict[str, Any]) -> list[Block]:
    ex = (m.get("examples") or {}).get("compress") or []
    if not ex:
        return []
    return [("p", "Token compression keeps whole words (the most informative, and every word holding a digit, "
                  "'?', ':' or a newline); a few prompts before and after:"),
            ("table", ["before", "after"], [[_fields(e["before"]), _fields(e["after"])] for e in ex])]


def _rewrite_section(m: dict[str, Any]) -> list[Block]:
    r = m.get("rewrite")
    if not r:
        return []
    rows = [[s["round"], s["proposed"], s["accepted"],
             "; ".join(f"{k}: {v}" for k, v in sorted(s["refused"].items(), key=lambda kv: -kv[1]))]
            for s in r.get("rounds", [])]
    blocks: list[Block] = [("h2", "Rewrite"),
                           ("p", f"{r['rows_rewritten']:,d} kept rows rewritten ({r['rounds_accepted']:,d} accepted "
                                 "proposals in all); a proposal is refused when it loses a number or name of the "
                                 "answer, changes the length too much, or makes the answer harder for the reference LM."),
                           ("table", ["round", "proposed", "accepted", "refused (why)"], rows)]
    if r.get("examples"):
        blocks.append(("table", ["before", "after"], [[_fields(e["before"]), _fields(e["after"])] for e in r["examples"]]))
    return blocks


def _judge_section(run_dir: Path, out: Path) -> list[Block]:
    """The LLM judge's score distribution over the rows it scored, and how it ranks them against IFD."""
    import numpy as np
    import pyarrow.parquet as pq

    from damoc.report.agreement import spearman

    parts = []
    for name in ("train.parquet", "dropped.parquet"):
        f = run_dir / "data" / name
        if f.is_file() and "judge" in pq.ParquetFile(f).schema_arrow.names:
            parts.append(pq.read_table(f, columns=["id", "judge", "ifd"]).to_pandas())
    if not parts:
        return []
    import pandas as pd

    df = pd.concat(parts).dropna(subset=["judge"])
    if df.empty:
        return []
    plots.histogram_png(out / "judge.png", df["judge"].to_numpy(), "LLM judge scores", "expected score (1-5)")
    both = df.dropna(subset=["ifd"])
    rho = spearman(dict(zip(both["id"], both["judge"])), dict(zip(both["id"], both["ifd"]))) if len(both) > 2 else None
    q = np.percentile(df["judge"], [10, 50, 90])
    return [("h2", "LLM judge"),
            ("p", f"{len(df):,d} rows scored; median {q[1]:.2f} (10%: {q[0]:.2f}, 90%: {q[2]:.2f})"
                  + (f"; Spearman rank correlation with IFD {rho:+.2f}." if rho is not None else ".")),
            ("img", "judge.png", "distribution of the judge's expected scores")]


def steadiness_note(finetune: dict[str, Any], ranking: dict[str, Any]) -> str:
    """Which trials went on past a rung that ASHA's cut alone would have stopped them at, and why (the
    ranking was not yet steady: tune.stop_confidence), and so which saving the run reached."""
    kept = [(e["name"], int(step), why) for e in finetune.get("candidates", [])
            for step, why in sorted(e.get("kept_because", {}).items(), key=lambda kv: int(kv[0]))]
    if not kept:
        return ""
    ratio = (ranking.get("savings") or {}).get("ratio")
    return ("The ranking came before the saving: " + "; ".join(f"{n} went on from step {s} ({why})"
                                                                for n, s, why in kept)
            + ". ASHA's cut alone would have stopped " + ("it" if len({n for n, _, _ in kept}) == 1 else "them")
            + " there" + (f"; the saving this run reached is {ratio:.1f}x (Cost)." if ratio else "."))


def grace_note(auto: dict | None) -> str:
    if not auto:
        return ""
    reached = auto["projected_saving"] >= auto["target_saving"]
    return (f" Grace period auto: {auto['grace_period']} steps, the longest whose schedule projects a "
            f"{auto['target_saving']:g}x saving in rows x parameters against fine-tuning every candidate in full "
            f"({auto['full_rows']:,d} rows): {auto['projected_saving']:.1f}x"
            + ("." if reached else f" (out of reach above the floor of {auto['floor']} steps)."))
