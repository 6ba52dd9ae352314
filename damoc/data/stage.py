"""The data stage on Ray Data: read -> normalise -> score -> select -> compress -> write.

Pass 1 streams the corpus once: read units, normalise (bad rows quarantined with their
reason), hold out eval rows, run the row operators and the reference-LM scorer on an actor
pool, and write every row with its stats to a work folder. The selectors then read narrow
columns of it. Pass 2 marks their drops, compresses the kept rows and writes the outputs of
the run-directory contract. No row is ever removed without a reason:
input == kept + quarantined + sum(dropped).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from damoc import metrics
from damoc.data.compress import Compressor, count_prompt_tokens
from damoc.data.lm import LMScorer, smallest_model
from damoc.data.ops import (
    BATCH_ROWS,
    FILE_ROWS,
    Operator,
    RowOp,
    SelectContext,
    Selector,
    Timed,
    alive_mask,
    collect,
    get_operator,
    keep_where,
    report,
)
from damoc.data.readers import read_rows
from damoc.data.rewrite import Rewriter
from damoc.pipeline import Stage, StageContext, register_stage
from damoc.rundir import atomic_write_json
from damoc.spec import DataSpec, JobSpec

log = logging.getLogger("damoc.data")

# What `filter.method` means when the spec lists no operators explicitly.
DEFAULT_CHAINS: dict[str, list[tuple[str, dict]]] = {
    "none": [],
    "distribution": [("minhash_dedup", {}), ("k_center", {})],
    "quality": [("rules", {}), ("ifd_filter", {}), ("top_k", {"score": "ifd"})],
    "hybrid": [("rules", {}), ("ifd_filter", {}), ("minhash_dedup", {}), ("deita", {"score": "ifd"})],
}
TEXT_COLUMNS = ["id", "source", "instruction", "input", "output"]


def build_chain(data: DataSpec) -> list[Operator]:
    steps = ([(o.name, o.params) for o in data.filter.operators] if data.filter.operators is not None
             else DEFAULT_CHAINS[data.filter.method])
    return [get_operator(name)(**params) for name, params in steps]


def drop_key(reason: str) -> str:
    """Manifest key of a drop reason (the copied row's id is detail, not a category)."""
    return "near_duplicate" if reason.startswith("near_duplicate_of:") else reason


@ray.remote(num_cpus=0)
class Tally:
    """Seconds and rows in/out per operator, reported by the batches as they run."""

    def __init__(self):
        self.ops: dict[str, list[float]] = {}

    def add(self, name: str, seconds: float, n_in: int, n_out: int) -> None:
        acc = self.ops.setdefault(name, [0.0, 0, 0])
        acc[0] += seconds
        acc[1] += n_in
        acc[2] += n_out

    def get(self) -> dict[str, list[float]]:
        return self.ops


class SplitRows:
    """Adds `split` (train | eval, a seeded hash of the id when eval is a split) and `drop`."""

    def __init__(self, eval_ratio: float | None, seed: int):
        self.ratio, self.seed = eval_ratio, seed

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        df["drop"] = pd.Series([None] * len(df), dtype=object, index=df.index)
        if self.ratio is None:
            df["split"] = "train"
        else:
            u = [int.from_bytes(hashlib.blake2b(f"{self.seed}:{i}".encode(), digest_size=8).digest(), "big") / 2**64
                 for i in df["id"]]
            df["split"] = np.where(np.asarray(u) < self.ratio, "eval", "train")
        return df


class AliveScorer(LMScorer):
    """The reference-LM scorer applied to alive rows only; other rows get empty stats."""

    def __init__(self, tally, **kwargs):
        super().__init__(**kwargs)
        self.tally = tally

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        t0 = time.perf_counter()
        alive = alive_mask(df)
        for c in ("ce_cond", "ce_alone", "ifd", "ppl"):
            df[c] = np.float32("nan")
        df["embedding"] = pd.Series([None] * len(df), dtype=object, index=df.index)
        if alive.any():
            sub = {c: df.loc[alive, c].to_numpy() for c in ("instruction", "input", "output")}
            out = super().__call__(sub)
            for c in ("ce_cond", "ce_alone", "ifd", "ppl"):
                df.loc[alive, c] = out[c]
            if self.embeddings:
                df.loc[alive, "embedding"] = pd.Series([e.tobytes() for e in out["embedding"]],
                                                       index=df.index[alive], dtype=object)
        n = int(alive.sum())
        report(self.tally, "lm_stats", time.perf_counter() - t0, n, n)
        return df


class DropTable:
    """The selectors' drops ({row id: reason}) as arrays: sorted UTF-8 ids and reason codes. Arrays
    cross the object store without a copy per worker; a dict of a million strings would be
    unpickled whole in every process that applies it."""

    def __init__(self, drops: dict[str, str]):
        self.reasons = sorted(set(drops.values()))
        code = {r: i for i, r in enumerate(self.reasons)}
        ids = np.array([k.encode() for k in drops], dtype=bytes) if drops else np.zeros(0, dtype="S1")
        order = np.argsort(ids, kind="stable")
        self.ids = ids[order]
        self.codes = np.fromiter((code[v] for v in drops.values()), dtype=np.int32, count=len(drops))[order]

    def lookup(self, ids: pd.Series) -> pd.Series:
        """The drop reason of each id, or None."""
        out = pd.Series([None] * len(ids), dtype=object, index=ids.index)
        if len(self.ids) == 0 or len(ids) == 0:
            return out
        q = np.array([i.encode() for i in ids], dtype=bytes)
        pos = np.minimum(np.searchsorted(self.ids, q), len(self.ids) - 1)
        hit = self.ids[pos] == q
        out[hit] = [self.reasons[c] for c in self.codes[pos[hit]]]
        return out


_TABLES: dict[str, DropTable] = {}  # per worker process: each table is fetched once


class ApplyDrops:
    """Per batch: set `drop` from the selectors' table (rows already dropped keep their reason)."""

    def __init__(self, table_ref: ray.ObjectRef):
        self.ref = table_ref

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        key = self.ref.hex()
        if key not in _TABLES:
            _TABLES.clear()
            _TABLES[key] = ray.get(self.ref)
        merged = df["drop"].where(df["drop"].notna(), _TABLES[key].lookup(df["id"])).astype(object)
        # A batch without drops would come out as float NaN; the column holds text or null.
        df["drop"] = merged.where(merged.notna(), None)
        return df


def apply_drops(ds, drops: dict[str, str]):
    """`ds` with the selectors' drops marked (the table goes through the object store once)."""
    return ds.map_batches(ApplyDrops(ray.put(DropTable(drops))), batch_format="pandas", batch_size=BATCH_ROWS)


def actor_pool(d: DataSpec, concurrent_pools: int) -> dict[str, Any]:
    """map_batches arguments for a model actor pool. Actors that hold every CPU starve the read
    and map tasks feeding them (the stream then hangs), so one CPU is always left for tasks."""
    cpus = float(ray.cluster_resources().get("CPU", 1))
    per_actor = min(1.0, max(0.05, (cpus - 1) / max(1, concurrent_pools * d.num_actors)))
    return dict(compute=ray.data.ActorPoolStrategy(size=d.num_actors), batch_size=d.batch_size,
                num_cpus=per_actor, num_gpus=d.num_gpus_per_actor, batch_format="pandas")


def write_parquet_file(ds, path: Path, columns: list[str]) -> int:
    """Stream a dataset into one Parquet file."""
    sink = ParquetSink(path, columns)
    for batch in ds.iter_batches(batch_format="pandas", batch_size=8192):
        sink.write(batch)
    return sink.close()


def write_quarantine(ds, path: Path, split: str) -> int:
    n = 0
    with open(path, "a", encoding="utf-8") as fh:
        for batch in ds.select_columns(["id", "source", "reason", "raw"]).iter_batches(
                batch_format="pandas", batch_size=8192):
            fh.write(quarantine_lines(batch, split))
            n += len(batch)
    return n


def destination(df: pd.DataFrame) -> np.ndarray:
    """Where each row of pass 2 goes: quarantine, eval, dropped or train (in that precedence)."""
    out = np.full(len(df), "train", dtype=object)
    out[(df["drop"].notna()).to_numpy()] = "dropped"
    out[(df["split"] == "eval").to_numpy()] = "eval"
    out[df["reason"].notna().to_numpy()] = "quarantine"
    return out


def on_kept(fn):
    """A batch function or callable class applied to the kept (alive) rows of a batch only; the other
    rows pass through untouched, so pass 2 is one stream that carries every destination."""
    def split(df: pd.DataFrame, call) -> pd.DataFrame:
        kept = alive_mask(df)
        if kept.all():
            return call(df)
        if not kept.any():
            return df
        done = call(df[kept].copy())
        return pd.concat([done, df[~kept]]).loc[df.index]

    if isinstance(fn, type):
        class KeptOnly(fn):
            def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
                return split(df, super().__call__)

        KeptOnly.__name__ = fn.__name__
        return KeptOnly

    def kept_only(df: pd.DataFrame, **kwargs) -> pd.DataFrame:
        return split(df, lambda sub: fn(sub, **kwargs))

    kept_only.__name__ = fn.__name__
    return kept_only


class ParquetSink:
    """One Parquet file written batch by batch (the contract names a file, not a folder)."""

    def __init__(self, path: Path, columns: list[str], ints: tuple[str, ...] = ()):
        self.path, self.columns, self.ints = path, columns, ints
        self.writer, self.rows = None, 0

    def write(self, df: pd.DataFrame) -> None:
        if df.empty:
            return
        df = df[[c for c in self.columns if c in df]].copy()
        for c in self.ints:
            if c in df:
                df[c] = df[c].astype(np.int64)
        table = pa.Table.from_pandas(df, preserve_index=False)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema)
        self.writer.write_table(table.cast(self.writer.schema))
        self.rows += len(df)

    def close(self) -> int:
        if self.writer is not None:
            self.writer.close()
        else:
            pq.write_table(pa.table({c: pa.array([], pa.string()) for c in TEXT_COLUMNS}), self.path)
        return self.rows


def quarantine_lines(df: pd.DataFrame, split: str) -> str:
    return "".join(json.dumps({"id": r.id, "source": r.source, "split": split, "reason": r.reason, "raw": r.raw},
                              ensure_ascii=False) + "\n" for r in df[["id", "source", "reason", "raw"]].itertuples(index=False))


@register_stage
class DataStage(Stage):
    name = "data"
    output = "data"
    spec_keys = ("data", "candidates")  # the default reference LM is the smallest candidate
    version = "1"

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

    def reference_model(self, ctx: StageContext) -> str:
        d = ctx.spec.data
        if d.reference_model:
            return self.local_or_hub(ctx, d.reference_model)
        local = [ctx.resolve(c.path) for c in ctx.spec.candidates if c.path]
        if not local:
            raise ValueError("data.reference_model: needed when no candidate is a local folder")
        return smallest_model(local)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        ctx.runtime  # noqa: B018 - start (or join) Ray
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # keep the progress bars, not the chatter
        d, t0 = ctx.spec.data, time.monotonic()
        chain = build_chain(d)
        rowops = [op for op in chain if isinstance(op, RowOp)]
        selectors = [op for op in chain if isinstance(op, Selector)]
        needs_emb = any(op.needs_embedding for op in chain)
        needs_lm = needs_emb or any(op.needs_lm for op in chain)
        ref = self.reference_model(ctx)  # also counts prompt tokens when nothing else needs it
        emb_model = ctx.resolve(d.embedding_model) if d.embedding_model else None
        tally = Tally.remote()
        n_pools = int(needs_lm) + sum(1 for op in rowops if getattr(op, "actor_class", None))
        pool = actor_pool(d, n_pools)
        work = ctx.out / "_work"

        # Pass 1: stream the corpus once, every row with its stats.
        ds = read_rows(d.train, d.fields, str(ctx.base_dir))
        ds = ds.map_batches(SplitRows(d.eval.split_ratio, ctx.spec.seed), batch_format="pandas",
                            batch_size=BATCH_ROWS)
        lm_added, streamed = False, []  # the streamed operators, in pipeline order
        for op in rowops:
            if op.needs_lm and not lm_added:
                ds, lm_added = self._add_lm(ds, ref, d, needs_emb, tally, pool, emb_model), True
                streamed.append("lm_stats")
            if getattr(op, "actor_class", None):
                params = op.p.model_dump()  # paths resolved here: actors need not share our cwd
                params["model"] = self.local_or_hub(ctx, params["model"])
                if params.get("prompt_file"):
                    params["prompt_file"] = ctx.resolve(params["prompt_file"])
                ds = ds.map_batches(op.actor_class, fn_constructor_kwargs={"params": params, "tally": tally},
                                    **pool)
            else:
                ds = ds.map_batches(Timed(op.name, op.apply, tally), batch_format="pandas", batch_size=BATCH_ROWS)
            streamed.append(op.name)
        if needs_lm and not lm_added:
            ds = self._add_lm(ds, ref, d, needs_emb, tally, pool, emb_model)
            streamed.append("lm_stats")
        scratch: list[str] = []  # selector columns computed while streaming, never written out
        for sel in selectors:
            if sel.prepared_columns:
                ds = ds.map_batches(Timed(f"{sel.name}:prepare", sel.prepare, tally), batch_format="pandas",
                                    batch_size=BATCH_ROWS)
                streamed.append(f"{sel.name}:prepare")
                scratch += list(sel.prepared_columns)
        ds.write_parquet(str(work / "scored"), max_rows_per_file=FILE_ROWS)
        scored = ray.data.read_parquet(str(work / "scored"))
        cols = collect(scored, ["reason", "split", "drop"])
        quarantined = int(pd.notna(cols["reason"]).sum())
        held_out = int(((cols["split"] == "eval") & pd.isna(cols["reason"])).sum())
        readable = len(cols["reason"]) - quarantined - held_out
        # Selectors only drop rows that are alive, so the alive count follows without another pass.
        alive_after_rows = int(alive_mask(pd.DataFrame(cols)).sum())
        log.info("data: read %d rows (%d quarantined, %d held out for eval) in %.1fs",
                 len(cols["reason"]), quarantined, held_out, time.monotonic() - t0)

        # Selection: each selector sees the rows still alive.
        budget = round(d.filter.keep_ratio * readable) if any(s.budgeted for s in selectors) else None
        drops: dict[str, str] = {}
        timings: list[dict[str, Any]] = []
        for sel in selectors:
            ts = time.monotonic()
            alive = keep_where(apply_drops(scored, drops), alive_mask)
            n_alive = alive_after_rows - len(drops)
            new = sel.select(alive, budget, SelectContext(ctx.spec.seed, n_alive, d.batch_size,
                                                                 str(work / sel.name)))
            drops.update(new)
            timings.append({"name": sel.name, "seconds": round(time.monotonic() - ts, 3),
                            "in": n_alive, "out": n_alive - len(new)})
            log.info("data: %s kept %d of %d rows in %.1fs", sel.name, n_alive - len(new), n_alive,
                     time.monotonic() - ts)

        # Pass 2, one stream: apply drops, rewrite and compress the kept rows, and route every row to
        # its file (train, dropped, quarantine, eval) as it goes by.
        final = apply_drops(scored, drops)
        if needs_emb or scratch:
            final = final.drop_columns((["embedding"] if needs_emb else []) + scratch)
        if d.rewrite.enabled:  # before compression: the writer sees whole sentences
            writer = d.rewrite.model and self.local_or_hub(ctx, d.rewrite.model)
            final = final.map_batches(on_kept(Rewriter), fn_constructor_kwargs=dict(
                reference=ref, model=writer, endpoint=d.rewrite.endpoint, rounds=d.rewrite.rounds,
                max_length=d.max_length), **pool)
        tc = time.monotonic()
        if d.compress.enabled:
            final = final.map_batches(on_kept(Compressor), fn_constructor_kwargs=dict(
                model_path=ref, ratio=d.compress.ratio, forced=d.compress.forced_tokens,
                compress_answer=d.compress.compress_answer, max_length=d.max_length), **pool)
        else:
            final = final.map_batches(on_kept(count_prompt_tokens), fn_kwargs=dict(model_path=ref),
                                      batch_format="pandas", batch_size=BATCH_ROWS)
        stats_cols = [c for c in ("chars", "repetition", "special_ratio", "ce_cond", "ce_alone", "ifd", "ppl",
                                  "judge") if c in scored.schema().names]
        token_cols = ("prompt_tokens_before", "prompt_tokens_after", "rewrite_rounds")
        sinks = {"train": ParquetSink(ctx.out / "train.parquet", TEXT_COLUMNS + stats_cols + list(token_cols),
                                      ints=token_cols),
                 "dropped": ParquetSink(ctx.out / "dropped.parquet", TEXT_COLUMNS + ["drop"] + stats_cols)}
        if d.eval.split_ratio is not None:
            sinks["eval"] = ParquetSink(ctx.out / "eval.parquet", TEXT_COLUMNS)
        qpath = ctx.out / "quarantine.jsonl"
        tokens_before = tokens_after = 0
        rounds_parts: list[np.ndarray] = []
        drop_reasons: dict[str, int] = {}
        with open(qpath, "w", encoding="utf-8") as qfh:
            for batch in final.iter_batches(batch_format="pandas", batch_size=8192):
                dest = destination(batch)
                for name, sink in sinks.items():
                    sink.write(batch[dest == name])
                if (dest == "quarantine").any():
                    qfh.write(quarantine_lines(batch[dest == "quarantine"], "train"))
                kept_rows = batch[dest == "train"]
                if len(kept_rows):
                    tokens_before += int(kept_rows["prompt_tokens_before"].sum())
                    tokens_after += int(kept_rows["prompt_tokens_after"].sum())
                    if d.rewrite.enabled:
                        rounds_parts.append(kept_rows["rewrite_rounds"].to_numpy(dtype=np.int64))
                for reason, n in batch.loc[dest == "dropped", "drop"].map(drop_key).value_counts().items():
                    drop_reasons[reason] = drop_reasons.get(reason, 0) + int(n)
        written = {name: sink.close() for name, sink in sinks.items()}
        kept = written["train"]
        steps = (["rewrite"] if d.rewrite.enabled else []) + ["compress" if d.compress.enabled else "count_tokens"]
        timings.append({"name": "+".join(steps), "seconds": round(time.monotonic() - tc, 3),
                        "in": kept, "out": kept})
        rewrite = None
        if d.rewrite.enabled:
            rounds = np.concatenate(rounds_parts) if rounds_parts else np.zeros(0, dtype=int)
            rewrite = {"rows_rewritten": int((rounds > 0).sum()), "rounds_accepted": int(rounds.sum()),
                       "rows_by_rounds": {str(r): int((rounds == r).sum()) for r in range(d.rewrite.rounds + 1)}}
        eval_info = self._write_eval(ctx, written.get("eval"), qpath)

        dropped = dict(drop_reasons)
        if held_out:
            dropped["held_out_eval"] = held_out
        n_input = len(cols["reason"])
        if n_input != kept + quarantined + sum(dropped.values()):
            raise RuntimeError(f"row accounting broke: input {n_input} != kept {kept} + quarantined "
                               f"{quarantined} + dropped {sum(dropped.values())}")
        ops = ray.get(tally.get.remote())
        operators = [{"name": "read", "seconds": None, "in": n_input, "out": n_input - quarantined}]
        operators += [{"name": k, "seconds": round(ops[k][0], 3), "in": int(ops[k][1]), "out": int(ops[k][2])}
                      for k in streamed if k in ops]
        operators += timings
        manifest = {
            "input": n_input, "kept": kept, "quarantined": quarantined, "dropped": dropped,
            "readable": readable, "keep_ratio": d.filter.keep_ratio, "budget": budget,
            "tokens_before": tokens_before, "tokens_after": tokens_after,
            "reference_model": ref, "operators": operators, "eval": eval_info, "rewrite": rewrite,
            "seconds": round(time.monotonic() - t0, 3),
        }
        atomic_write_json(ctx.out / "manifest.json", manifest)
        metrics.record_data(ctx.spec.name, manifest)
        shutil.rmtree(work, ignore_errors=True)
        return {"input": n_input, "kept": kept, "quarantined": quarantined, "dropped": sum(dropped.values()),
                "eval": eval_info["rows"], "tokens_before": tokens_before, "tokens_after": tokens_after}

    def _add_lm(self, ds, ref: str, d: DataSpec, embeddings: bool, tally, pool: dict, emb_model: str | None):
        return ds.map_batches(AliveScorer, fn_constructor_kwargs=dict(
            tally=tally, model_path=ref, max_length=d.max_length, embeddings=embeddings,
            embedding_model=emb_model), **pool)

    def _write_eval(self, ctx: StageContext, split_rows: int | None, qpath: Path) -> dict[str, int]:
        """Eval rows are never filtered, compressed or rewritten. A split was written in pass 2;
        a separate eval source is read and written here."""
        d = ctx.spec.data
        if split_rows is not None:
            return {"input": split_rows, "rows": split_rows, "quarantined": 0}
        ev = read_rows(d.eval, d.fields, str(ctx.base_dir)).materialize()
        n = write_parquet_file(keep_where(ev, lambda df: df["reason"].isna()), ctx.out / "eval.parquet", TEXT_COLUMNS)
        q = write_quarantine(keep_where(ev, lambda df: df["reason"].notna()), qpath, "eval")
        return {"input": n + q, "rows": n, "quarantined": q}
