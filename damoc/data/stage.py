"""The data stage on Ray Data: read -> normalise -> score -> select -> compress -> write.

Read top to bottom (`DataStage.run`):
1. plan: the operator chain, the reference LM, what each pass computes.
2. pass 1, one Ray Data stream over the training source and the eval source: normalise (bad rows
   quarantined with their reason), hold out eval rows, run the row operators and the reference-LM
   scorer on actor pools (IFD, embeddings, and the prompt's self-information, from which the
   fields are compressed in the same forward pass), and the selectors' per-row preparation. The
   driver consumes the stream: every row goes to the work folder, the narrow columns stay in
   memory (damoc/data/work.py).
3. select: each selector in turn, on the rows still alive.
4. pass 2: every row routed to its file (train, dropped, quarantine, eval) from the work folder; a
   rewrite, or compression that pass 1 could not do, runs here on the kept rows, on actor pools.
5. manifest: counts, tokens, per-operator seconds. No row is ever removed without a reason:
   input == kept + quarantined + sum(dropped).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from damoc import metrics
from damoc.data.lm import CompressArgs, loadable, smallest_model
from damoc.data.ops import BATCH_ROWS, Operator, RowOp, SelectContext, Selector, Steps, build_chain
from damoc.data.output import (
    EXAMPLES,
    STATS_COLUMNS,
    TEXT_COLUMNS,
    TOKEN_COLUMNS,
    NoRowsLeft,
    ParquetSink,
    Routed,
    budget_note,
    drop_key,
    no_rows_reason,
    quarantine_lines,
)
from damoc.data.selection import by_share
from damoc.data.stream import (
    AliveScorer,
    ApplyDrops,
    DropTable,
    KeptCompressor,
    SplitRows,
    Tally,
    TokenCounter,
    actor_pool,
    count_part_tokens,
    destination,
    on_kept,
    reference_lm,
    tag_origin,
)
from damoc.data.readers import read_rows
from damoc.data.rewrite import Rewriter
from damoc.data.work import ALIVE, DROPPED, EVAL, QUARANTINED, WorkData, WorkRows, equals, fix_types
from damoc.pipeline import Stage, StageContext, register_stage
from damoc import records
from damoc.runtime import on_head_node
from damoc.schedule import row_budget
from damoc.spec import JobSpec

log = logging.getLogger("damoc.data")


def _rss_mib() -> str:
    import psutil

    m = psutil.Process().memory_full_info()
    return f"{m.rss / 2**20:.0f} (private {m.uss / 2**20:.0f})"


@dataclass
class Plan:
    """What the passes compute, decided once from the spec."""

    chain: list[Operator]
    references: list[tuple[str, str]]  # (name, path) of each reference LM; shares index this list
    needs_lm: bool
    needs_emb: bool
    compress_in_pass1: bool  # the scorer compresses from its own forward pass
    pass2_models: bool  # a rewrite or a compression still to run on the kept rows
    pools: int  # actor pools in pass 1 (for sharing the CPUs)
    columns: list[str] = field(default_factory=list)  # narrow columns the selectors read

    @property
    def reference(self) -> str:
        """The tokenizer that counts prompt tokens where no model ran (counting favours no one)."""
        return self.references[0][1]

    @property
    def shared(self) -> bool:
        return len(self.references) > 1

    @property
    def rowops(self) -> list[RowOp]:
        return [op for op in self.chain if isinstance(op, RowOp)]

    @property
    def selectors(self) -> list[Selector]:
        return [op for op in self.chain if isinstance(op, Selector)]


@register_stage
class DataStage(Stage):
    name = "data"
    output = "data"
    spec_keys = ("data", "candidates")  # by default the candidates are the reference LMs
    version = "2"

    def fingerprint_extra(self, spec: JobSpec) -> dict[str, Any]:
        return {"template": spec.finetune.template}  # rows are scored as training renders them

    def fingerprint_spec(self, spec: JobSpec) -> dict[str, Any]:
        """Without a model over the rows (no scores, no compression, no rewrite), who would have scored
        them changes nothing: a full fine-tuning reference run stays current when that rule changes."""
        section = super().fingerprint_spec(spec)
        d = spec.data
        if not (d.compress.enabled or d.rewrite.enabled or any(op.needs_lm or op.needs_embedding
                                                               for op in build_chain(d))):
            section["data"].pop("reference_lm", None)
        return section

    def external_inputs(self, spec: JobSpec) -> list[str]:
        d = spec.data
        paths = [s.path for s in (d.train, d.eval) if s.path]
        paths += [m for m in (d.reference_model, d.rewrite.model, d.embedding_model) if m]
        for op in d.filter.operators or []:  # a judge's model and prompt are inputs too
            paths += [op.params[k] for k in ("model", "prompt_file") if isinstance(op.params.get(k), str)]
        return paths

    @staticmethod
    def local_or_hub(ctx: StageContext, name: str) -> str:
        """A local folder if one exists at that path, else a hub id."""
        local = ctx.resolve(name)
        return local if Path(local).exists() else name

    def references(self, ctx: StageContext) -> list[tuple[str, str]]:
        """(name, path) of the reference LMs: the spec's reference_model, else the loadable local
        candidates (data.reference_lm: shared) or the smallest of them."""
        d = ctx.spec.data
        if d.reference_model:
            path = self.local_or_hub(ctx, d.reference_model)
            return [(Path(path).name, path)]
        local = {c.name: ctx.resolve(c.path) for c in ctx.spec.candidates if c.path}
        if not local:
            raise ValueError("data.reference_model: needed when no candidate is a local folder")
        ok = [smallest_model(list(local.values()))] if d.reference_lm == "smallest" else loadable(list(local.values()))
        return [(n, p) for n, p in local.items() if p in ok][: 1 if d.reference_lm == "smallest" else None]

    def run(self, ctx: StageContext) -> dict[str, Any]:
        ctx.runtime  # noqa: B018 - start (or join) Ray
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # keep the progress bars, not the chatter
        options = ray.data.DataContext.get_current().execution_options
        before, options.preserve_order = options.preserve_order, True
        try:
            return self._run(ctx)
        finally:
            options.preserve_order = before

    def _run(self, ctx: StageContext) -> dict[str, Any]:
        """Blocks come out of the stream in input order (preserve_order): the output files list rows in
        the order they were read whatever the timing, so the calibration sample, the first eval rows and
        the training batches of a seeded run are the same every time."""
        t0 = time.monotonic()
        plan = self.plan(ctx)
        tally = Tally.options(scheduling_strategy=on_head_node()).remote()  # survives a lost worker node
        work, streamed = self.pass1(ctx, plan, tally)
        log.debug("data: driver RSS %s MiB after pass 1", _rss_mib())
        drops, timings = self.select(ctx, plan, work)
        log.debug("data: driver RSS %s MiB after selection", _rss_mib())
        routed, seconds = self.pass2(ctx, plan, work, drops, tally)
        log.debug("data: driver RSS %s MiB after pass 2", _rss_mib())
        ops = ray.get(tally.get.remote())
        manifest = self.manifest(ctx, plan, work, routed, streamed, ops, timings, seconds, t0)
        shutil.rmtree(ctx.out / "_work", ignore_errors=True)
        if manifest["kept"] == 0:  # the quarantine and the manifest stay beside the error (RUN/data.failed)
            raise NoRowsLeft(no_rows_reason(manifest, ctx.out / "quarantine.jsonl"))
        return {"input": manifest["input"], "kept": manifest["kept"], "quarantined": manifest["quarantined"],
                # the held-out eval rows are counted apart (the manifest lists them among its drops)
                "dropped": sum(v for k, v in manifest["dropped"].items() if k != "held_out_eval"),
                "eval": manifest["eval"]["rows"],
                "tokens_before": manifest["tokens_before"], "tokens_after": manifest["tokens_after"]}

    # ------------------------------------------------------------ 1. plan

    def plan(self, ctx: StageContext) -> Plan:
        d = ctx.spec.data
        chain = build_chain(d)
        needs_emb = any(op.needs_embedding for op in chain)
        needs_lm = needs_emb or any(op.needs_lm for op in chain)
        compress1 = d.compress.enabled and needs_lm and not d.rewrite.enabled
        refs = self.references(ctx)
        pools = int(needs_lm) * len(refs) + sum(1 for op in chain if isinstance(op, RowOp) and op.actor_class)
        columns = sorted({c for op in chain if isinstance(op, Selector) for c in op.columns} | {"scorer"})
        return Plan(chain, refs, needs_lm, needs_emb, compress1,
                    d.rewrite.enabled or (d.compress.enabled and not compress1), pools, columns)

    # ------------------------------------------------------------ 2. pass 1

    def pass1(self, ctx: StageContext, plan: Plan, tally) -> tuple[WorkData, list[str]]:
        """One stream over both sources; the driver writes it to the work folder as it goes."""
        d, t0 = ctx.spec.data, time.monotonic()
        pool = actor_pool(d, plan.pools)
        # The CPU steps before the first model ride inside the read tasks (readers.read_rows); the ones
        # after a model run as one map_batches call each.
        steps: list[tuple[str | None, Any]] = [
            (None, SplitRows(d.eval.split_ratio, ctx.spec.seed, [n for n, _ in plan.references]))]
        streamed: list[str] = []
        ds = None

        def flush(ds):  # the CPU steps gathered so far, in the read tasks or as one map_batches call
            if ds is None:
                train = Steps([(None, tag_origin("train")), *steps], tally)
                ds = read_rows(d.train, d.fields, str(ctx.base_dir), post=train)
                if d.eval.split_ratio is None:  # a separate eval source rides in the same stream
                    ev = Steps([(None, tag_origin("eval")), *steps], None)
                    ds = ds.union(read_rows(d.eval, d.fields, str(ctx.base_dir), post=ev))
            elif steps:
                ds = ds.map_batches(Steps(list(steps), tally), batch_format="pandas", batch_size=BATCH_ROWS)
            steps.clear()
            return ds

        for op in plan.rowops:
            if op.needs_lm and "lm_stats" not in streamed:
                ds = self._add_lm(ctx, flush(ds), plan, tally, pool)
                streamed.append("lm_stats")
            if op.actor_class is not None:
                ds = flush(ds).map_batches(op.actor_class, fn_constructor_kwargs=op.actor_kwargs(
                    lambda p: self.local_or_hub(ctx, p), tally), **pool)
            else:
                steps.append((op.name, op.apply))
            streamed.append(op.name)
        if plan.needs_lm and "lm_stats" not in streamed:
            ds = self._add_lm(ctx, flush(ds), plan, tally, pool)
            streamed.append("lm_stats")
        for sel in plan.selectors:
            if sel.prepared_columns:
                steps.append((f"{sel.name}:prepare", sel.prepare))
                streamed.append(f"{sel.name}:prepare")
        ds = flush(ds)
        rows = WorkRows(ctx.out / "_work" / "scored", plan.columns, plan.needs_emb)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            rows.add(batch)
        work = rows.close()
        work.spread = ctx.remote is None
        train = ~work.origin_eval
        log.info("data: read %d rows (%d quarantined, %d held out for eval) in %.1fs (%.1fs writing the work "
                 "folder)", int(train.sum()), int((work.status[train] == QUARANTINED).sum()),
                 int((work.status[train] == EVAL).sum()), time.monotonic() - t0, rows.seconds)
        return work, streamed

    def _add_lm(self, ctx: StageContext, ds, plan: Plan, tally, pool: dict):
        """One scorer per reference LM, each on its own share of the rows (one pool each, at once)."""
        d = ctx.spec.data
        compress = CompressArgs.of(d.compress) if plan.compress_in_pass1 else None
        for k, (name, path) in enumerate(plan.references):
            ds = ds.map_batches(AliveScorer, fn_constructor_kwargs=dict(
                tally=tally, share=k if plan.shared else None, name=name, model_path=path, task=d.task,
                template=ctx.spec.finetune.template, max_length=d.max_length, embeddings=plan.needs_emb,
                compress=compress, embedding_model=ctx.resolve(d.embedding_model) if d.embedding_model else None),
                **pool)
        return ds

    # ------------------------------------------------------------ 3. select

    def select(self, ctx: StageContext, plan: Plan, work: WorkData) -> tuple[pd.Series, list[dict]]:
        """Each selector on the rows still alive; their drops, reasons indexed by row order."""
        d = ctx.spec.data
        readable = int(((~work.origin_eval) & ((work.status == ALIVE) | (work.status == DROPPED))).sum())
        budget = row_budget(d.filter.keep_ratio, readable, any(s.budgeted for s in plan.selectors))
        parts: list[pd.Series] = []
        timings: list[dict[str, Any]] = []
        alive = work.alive
        sctx = SelectContext(ctx.spec.seed, d.batch_size, work)
        for sel in plan.selectors:
            ts = time.monotonic()
            if parts:
                alive = alive[~alive["order"].isin(parts[-1].index)]
            if plan.shared and (sel.needs_lm or sel.needs_embedding):
                new = by_share(sel, alive, budget, sctx)
            else:
                new = sel.select(alive.reset_index(drop=True), budget, sctx)
            parts.append(new)
            timings.append({"name": sel.name, "seconds": round(time.monotonic() - ts, 3),
                            "in": len(alive), "out": len(alive) - len(new)})
            log.info("data: %s kept %d of %d rows in %.1fs", sel.name, len(alive) - len(new), len(alive),
                     time.monotonic() - ts)
        return (pd.concat(parts) if parts else pd.Series([], dtype=object)), timings

    # ------------------------------------------------------------ 4. pass 2

    def pass2(self, ctx: StageContext, plan: Plan, work: WorkData, drops: pd.Series,
              tally) -> tuple[Routed, float]:
        """Every row to its file. Kept rows take their compressed fields."""
        d, t0 = ctx.spec.data, time.monotonic()
        sinks = {"train": ParquetSink(ctx.out / "train.parquet", TEXT_COLUMNS + list(STATS_COLUMNS) +
                                      list(TOKEN_COLUMNS), ints=TOKEN_COLUMNS),
                 "dropped": ParquetSink(ctx.out / "dropped.parquet", TEXT_COLUMNS + ["drop", *STATS_COLUMNS]),
                 "eval": ParquetSink(ctx.out / "eval.parquet", TEXT_COLUMNS)}
        routed = Routed(written={})
        counter = TokenCounter(plan.reference)
        with open(ctx.out / "quarantine.jsonl", "w", encoding="utf-8") as qfh:
            for batch in self._final_rows(ctx, plan, work, drops, counter, tally):
                self._route(batch, sinks, qfh, routed, d.rewrite.enabled, counter)
        routed.written = {name: sink.close() for name, sink in sinks.items()}
        return routed, time.monotonic() - t0

    def _final_rows(self, ctx: StageContext, plan: Plan, work: WorkData, drops: pd.Series,
                    counter: TokenCounter, tally=None) -> Iterator[pa.Table]:
        """The work folder's rows with the selectors' drops applied: read here in the driver, or, when
        models still have to run on the kept rows, streamed through Ray Data actor pools. When no model
        counted the prompt tokens, the kept rows of each part file are counted by a Ray task while the
        driver routes (the one part of routing that is heavy)."""
        d, table = ctx.spec.data, DropTable(drops)
        if not plan.pass2_models:
            ref = ray.put(table)
            counts = ([count_part_tokens.remote(str(f), ref, plan.reference) for f in work.files]
                      if not plan.needs_lm else [])
            for i, f in enumerate(work.files):
                counter.known = ray.get(counts[i]) if counts else None
                for b in pq.ParquetFile(f).iter_batches(batch_size=8192):
                    yield table.apply_arrow(pa.Table.from_batches([b]))
            return
        pool = actor_pool(d, len(plan.references) * (1 + int(d.rewrite.enabled)))  # all at once
        ds = ray.data.read_parquet([str(f) for f in work.files]).map_batches(
            ApplyDrops(ray.put(table)), batch_format="pandas", batch_size=BATCH_ROWS)
        compress = CompressArgs.of(d.compress, d.compress.enabled)
        # Each reference LM judges the rewrites of its own share, then compresses it.
        for k, (_, path) in enumerate(plan.references):
            share = k if plan.shared else None
            if d.rewrite.enabled:  # before compression: the writer sees whole sentences
                ds = ds.map_batches(on_kept(Rewriter, share), fn_constructor_kwargs=dict(
                    reference=path, model=d.rewrite.model and self.local_or_hub(ctx, d.rewrite.model),
                    endpoint=d.rewrite.endpoint, rounds=d.rewrite.rounds, max_length=d.max_length, task=d.task,
                    template=ctx.spec.finetune.template), **pool)
        for k, (name, path) in enumerate(plan.references):
            ds = ds.map_batches(on_kept(KeptCompressor, k if plan.shared else None), fn_constructor_kwargs=dict(
                tally=tally if not plan.needs_lm else None, name=name, model_path=path, task=d.task, template=ctx.spec.finetune.template, max_length=d.max_length,
                embeddings=False, compress=compress), **pool)
        for b in ds.iter_batches(batch_format="pyarrow", batch_size=8192):
            yield fix_types(b)

    @staticmethod
    def _route(batch: pa.Table, sinks: dict, qfh, routed: Routed, rewrite: bool, counter: TokenCounter) -> None:
        """One batch to its files, in Arrow: the driver turns only the kept rows' prompts into text."""
        dest = destination(batch)
        train_origin = equals(batch, "origin", "train")
        kept = batch.filter(pa.array(dest == "train"))
        if kept.num_rows and "c_instruction" in kept.column_names and len(routed.examples["compress"]) < EXAMPLES:
            for r in kept.slice(0, EXAMPLES - len(routed.examples["compress"])).select(
                    ["instruction", "input", "c_instruction", "c_input"]).to_pylist():
                routed.examples["compress"].append(
                    {"before": {"instruction": r["instruction"], "input": r["input"]},
                     "after": {"instruction": r["c_instruction"], "input": r["c_input"]}})
        if kept.num_rows and rewrite:
            routed.note_rewrites(kept["rewrite_log"].to_pylist(),
                                 kept.select(["instruction", "input", "output"]).to_pylist())
        if kept.num_rows and "prompt_tokens_before" not in kept.column_names:
            n = pa.array(counter(kept["instruction"].to_pylist(), kept["input"].to_pylist(),
                                 kept["order"].to_numpy().astype(np.int64, copy=False)))
            kept = kept.append_column("prompt_tokens_before", n).append_column("prompt_tokens_after", n)
        for c in ("instruction", "input", "output"):  # the compressed fields, where pass 1 or 2 made them
            if f"c_{c}" in kept.column_names:
                kept = kept.set_column(kept.schema.get_field_index(c), c,
                                       pc.coalesce(kept[f"c_{c}"].cast(pa.string()), kept[c]))
        sinks["train"].write(kept)
        sinks["dropped"].write(batch.filter(pa.array(dest == "dropped")))
        sinks["eval"].write(batch.filter(pa.array(dest == "eval")))
        if (dest == "quarantine").any():
            qfh.write(quarantine_lines(batch.filter(pa.array(dest == "quarantine"))))
        routed.eval_quarantined += int(((dest == "quarantine") & ~train_origin).sum())
        routed.eval_input += int((~train_origin).sum())
        if kept.num_rows:
            routed.tokens_before += int(pc.sum(kept["prompt_tokens_before"]).as_py() or 0)
            routed.tokens_after += int(pc.sum(kept["prompt_tokens_after"]).as_py() or 0)
            if rewrite:
                routed.rounds.append(kept["rewrite_rounds"].to_numpy().astype(np.int64))
        for item in pc.value_counts(batch.filter(pa.array(dest == "dropped"))["drop"]).to_pylist():
            key = drop_key(item["values"])
            routed.drop_reasons[key] = routed.drop_reasons.get(key, 0) + int(item["counts"])

    # ------------------------------------------------------------ 5. manifest

    def manifest(self, ctx: StageContext, plan: Plan, work: WorkData, routed: Routed, streamed: list[str],
                 ops: dict, timings: list[dict], pass2_seconds: float, t0: float) -> dict[str, Any]:
        d = ctx.spec.data
        train = ~work.origin_eval
        n_input = int(train.sum())
        quarantined = int((work.status[train] == QUARANTINED).sum())
        held_out = int((work.status[train] == EVAL).sum())
        kept = routed.written["train"]
        dropped = dict(routed.drop_reasons)
        if held_out:
            dropped["held_out_eval"] = held_out
        if n_input != kept + quarantined + sum(dropped.values()):
            raise RuntimeError(f"row accounting broke: input {n_input} != kept {kept} + quarantined "
                               f"{quarantined} + dropped {sum(dropped.values())}")
        operators = [{"name": "read", "seconds": None, "in": n_input, "out": n_input - quarantined}]
        operators += [{"name": k, "seconds": round(ops[k][0], 3), "in": int(ops[k][1]), "out": int(ops[k][2])}
                      for k in streamed if k in ops]
        operators += timings
        if plan.compress_in_pass1 and "compress" in ops:
            operators.append({"name": "compress", "seconds": round(ops["compress"][0], 3), "in": kept, "out": kept})
        elif plan.pass2_models:
            steps = (["rewrite"] if d.rewrite.enabled else []) + (["compress"] if d.compress.enabled else [])
            operators.append({"name": "+".join(steps) or "count_tokens", "seconds": round(pass2_seconds, 3),
                              "in": kept, "out": kept})
        rewrite = None
        if d.rewrite.enabled:
            rounds = np.concatenate(routed.rounds) if routed.rounds else np.zeros(0, dtype=int)
            rewrite = {"rows_rewritten": int((rounds > 0).sum()), "rounds_accepted": int(rounds.sum()),
                       "rows_by_rounds": {str(r): int((rounds == r).sum()) for r in range(d.rewrite.rounds + 1)},
                       "rounds": routed.rewrite_rounds, "examples": routed.examples["rewrite"]}
        eval_rows = routed.written["eval"]
        eval_info = ({"input": held_out, "rows": eval_rows, "quarantined": 0} if d.eval.split_ratio is not None
                     else {"input": routed.eval_input, "rows": eval_rows, "quarantined": routed.eval_quarantined})
        readable = n_input - quarantined - held_out  # keep_ratio is a fraction of these
        budget = row_budget(d.filter.keep_ratio, readable, any(s.budgeted for s in plan.selectors))
        note = budget_note(d.filter.keep_ratio, budget, kept, dropped, plan)
        if note:
            log.warning("data: %s", note)
        manifest = {
            "input": n_input, "kept": kept, "quarantined": quarantined, "dropped": dropped, "budget_note": note,
            "readable": readable, "keep_ratio": d.filter.keep_ratio, "budget": budget,
            "tokens_before": routed.tokens_before, "tokens_after": routed.tokens_after,
            # reference_model: the one LM that scored every row (null when the candidates shared them)
            "reference_model": None if plan.shared else plan.reference, "reference_lm": reference_lm(d, plan, ops),
            "operators": operators, "eval": eval_info, "rewrite": rewrite,
            "examples": {"compress": routed.examples["compress"]},
            "seconds": round(time.monotonic() - t0, 3),
        }
        records.write(records.Manifest, ctx.out / "manifest.json", manifest)
        metrics.record_data(ctx.spec.name, manifest)
        return manifest
