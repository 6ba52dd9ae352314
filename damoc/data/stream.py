"""The data stage's Ray Data plan, row by row: the eval split and the reference-LM shares drawn per row,
the scorer and compressor actors over the alive rows, the pools' sizes on the cluster, and the drop table
pass 2 applies. Every piece here runs on a batch, on whichever node Ray Data gives it."""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from damoc.data.lm import LMScorer, count_tokens, field_text, row_key, shares, unit_hash
from damoc.data.ops import alive_mask, report
from damoc.data.work import equals, valid
from damoc.lm.load import load_tokenizer
from damoc.spec import DataSpec

if TYPE_CHECKING:
    from damoc.data.stage import Plan

EVAL_ORDER = 1 << 62  # eval-source rows are ordered after every training row


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

    def add_many(self, timings: list[tuple[str, float, int, int]]) -> None:
        for t in timings:
            self.add(*t)

    def get(self) -> dict[str, list[float]]:
        return self.ops


class SplitRows:
    """Adds `split` (train | eval: every eval-source row, and a seeded hash of the row's content when
    eval is a split of the training rows), `scorer` (which reference LM scores the row: data.lm.shares)
    and `drop`. Both draws hash the row's fields, never its file or offset: converting a file changes
    neither, and duplicate rows land on the same side of the split."""

    def __init__(self, eval_ratio: float | None, seed: int, scorers: list[str]):
        self.ratio, self.seed, self.scorers = eval_ratio, seed, scorers

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        df["drop"] = pd.Series([None] * len(df), dtype=object, index=df.index)
        keys = [row_key(*r) for r in zip(df["instruction"], df["input"], df["output"])]
        split = np.where(df["origin"].to_numpy() == "eval", "eval", "train").astype(object)
        if self.ratio is not None:
            u = np.array([unit_hash(self.seed, "eval", k) for k in keys])
            split[u < self.ratio] = "eval"
        df["split"] = split
        df["scorer"] = shares(keys, self.scorers, self.seed)
        return df


def tag_origin(origin: str):
    """Marks where a row came from; eval-source rows get orders after every training row."""
    def tag(df: pd.DataFrame) -> pd.DataFrame:
        df["origin"] = origin
        if origin == "eval":
            df["order"] = df["order"].to_numpy(np.int64) + EVAL_ORDER
        return df

    return tag


def my_rows(df: pd.DataFrame, share: int | None) -> np.ndarray:
    """The alive rows of a batch that this reference LM scores (all of them when one LM scores all)."""
    alive = alive_mask(df)
    return alive if share is None else alive & (df["scorer"].to_numpy() == share)


class AliveScorer(LMScorer):
    """The reference-LM scorer applied to the alive rows of its share only; other rows keep what an
    earlier scorer wrote, or get empty stats."""

    def __init__(self, tally, share: int | None = None, name: str = "", **kwargs):
        super().__init__(**kwargs)
        self.tally, self.share, self.name = tally, share, name

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        t0 = time.perf_counter()
        alive = my_rows(df, self.share)
        for c in ("ce_cond", "ce_alone", "ifd", "ppl"):
            if c not in df:
                df[c] = np.float32("nan")
        for c in ("prompt_tokens_before", "prompt_tokens_after"):
            if c not in df:
                df[c] = np.int64(0)
        wide = ([("embedding", None)] if self.embeddings else []) + (
            [(c, None) for c in ("c_instruction", "c_input")] if self.compress else []) + (
            [("c_output", None)] if self.compress and self.compress.compress_answer else [])
        for c, v in wide:
            if c not in df:
                df[c] = pd.Series([v] * len(df), dtype=object, index=df.index)
        self.compress_seconds = 0.0
        if alive.any():
            sub = {c: df.loc[alive, c].to_numpy() for c in ("instruction", "input", "output")}
            out = super().__call__(sub)
            for c in ("ce_cond", "ce_alone", "ifd", "ppl", "prompt_tokens_before", "prompt_tokens_after"):
                df.loc[alive, c] = out[c]
            for c, _ in wide:
                values = [e.tobytes() for e in out[c]] if c == "embedding" else list(out[c])
                df.loc[alive, c] = pd.Series(values, index=df.index[alive], dtype=object)
        n = int(alive.sum())
        report(self.tally, "lm_stats", time.perf_counter() - t0 - self.compress_seconds, n, n)
        report(self.tally, f"scored_by:{self.name}", 0.0, n, n)
        if self.compress:
            report(self.tally, "compress", self.compress_seconds, n, n)
        return df


@functools.lru_cache(maxsize=4)
def cached_tokenizer(path: str):
    """A tokenizer loaded once per process (Ray reuses task processes)."""
    return load_tokenizer(path)


class TokenCounter:
    """Prompt tokens of the kept rows (their fields' text in the reference tokenizer), counted in the
    driver as pass 2 routes them, when no model ran over them: the tokenizer only, loaded on first use."""

    def __init__(self, model_path: str):
        self.model_path, self.tok = model_path, None
        self.known: tuple[np.ndarray, np.ndarray] | None = None  # (sorted orders, counts) counted elsewhere

    def __call__(self, instructions: list[str], inputs: list[str], orders: np.ndarray | None = None) -> np.ndarray:
        if self.known is not None and orders is not None:
            known, counts = self.known
            return counts[np.searchsorted(known, orders)]
        if self.tok is None:
            self.tok = cached_tokenizer(self.model_path)
        texts = [field_text(i, x or "") for i, x in zip(instructions, inputs)]
        return np.array(count_tokens(self.tok, texts), dtype=np.int64)


@ray.remote(num_cpus=1)
def count_part_tokens(path: str, drops: DropTable, model_path: str) -> tuple[np.ndarray, np.ndarray]:
    """(sorted orders, prompt tokens) of the rows of one part file that go to train."""
    t = drops.apply_arrow(pq.read_table(path, columns=["order", "instruction", "input", "drop", "split", "reason"]))
    kept = t.filter(pa.array(destination(t) == "train"))
    orders = kept["order"].to_numpy().astype(np.int64, copy=False)
    counts = TokenCounter(model_path)(kept["instruction"].to_pylist(), kept["input"].to_pylist())
    sort = np.argsort(orders)
    return orders[sort], counts[sort]


class DropTable:
    """The selectors' drops (reasons indexed by row order) as arrays: sorted orders and reason codes.
    Arrays cross the object store without a copy per worker; a dict of a million entries would be
    unpickled whole in every process that applies it."""

    def __init__(self, drops: pd.Series | dict[int, str]):
        drops = drops if isinstance(drops, pd.Series) else pd.Series(drops, dtype=object)
        codes, reasons = pd.factorize(drops.to_numpy(dtype=object))
        self.reasons = list(reasons)
        orders = drops.index.to_numpy(dtype=np.int64)
        sort = np.argsort(orders, kind="stable")
        self.orders, self.codes = orders[sort], codes.astype(np.int32)[sort]

    def lookup(self, orders: np.ndarray) -> list[str | None]:
        """The drop reason of each row order, or None."""
        out: list[str | None] = [None] * len(orders)
        if len(self.orders) == 0 or len(orders) == 0:
            return out
        pos = np.minimum(np.searchsorted(self.orders, orders), len(self.orders) - 1)
        for i in np.flatnonzero(self.orders[pos] == orders):
            out[i] = self.reasons[self.codes[pos[i]]]
        return out

    def apply_arrow(self, table: pa.Table) -> pa.Table:
        """`apply` on an Arrow batch."""
        found = pa.array(self.lookup(table["order"].to_numpy().astype(np.int64, copy=False)), type=pa.string())
        merged = pc.coalesce(table["drop"].cast(pa.string()), found)
        return table.set_column(table.schema.get_field_index("drop"), "drop", merged)

    def apply(self, df: pd.DataFrame) -> pd.DataFrame:
        """Set `drop` from the table (rows already dropped keep their reason)."""
        found = pd.Series(self.lookup(df["order"].to_numpy(np.int64)), index=df.index, dtype=object)
        merged = df["drop"].where(df["drop"].notna(), found).astype(object)
        df["drop"] = merged.where(merged.notna(), None)  # text or null, never float NaN
        return df


class ApplyDrops:
    """map_batches form of DropTable.apply; the table goes through the object store once."""

    def __init__(self, table_ref: ray.ObjectRef):
        self.ref, self.table = table_ref, None

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        if self.table is None:
            self.table = ray.get(self.ref)
        return self.table.apply(df)


def actor_cpus(cpus: float, actors: int) -> float:
    """CPUs each of `actors` model actors asks for. Actors that hold every CPU starve the read and
    map tasks feeding them (the stream then hangs), so one whole CPU is always left for tasks; on a
    one-CPU cluster the actors ask for none."""
    return min(1.0, max(0.0, (cpus - 1) / max(1, actors)))


def cpus_after_a_node_loss() -> float:
    """The cluster's CPUs less its largest node's, where several nodes have CPUs: actors sized for the whole
    cluster come back after a node is lost and hold every CPU left, and the tasks feeding them never run."""
    nodes = [n["Resources"]["CPU"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
    return sum(nodes) - max(nodes) if len(nodes) > 1 else float(sum(nodes) or 1)


def actor_gpus(asked: float, gpus: float, actors: int) -> float:
    """GPUs each of `actors` model actors asks for: what the spec asks, or an equal share of the cluster's
    GPUs where that is less. The pools of one stream all start at once (the candidates sharing the rows
    are one pool each): a pool left waiting for a GPU that an earlier pool holds would hang the stream."""
    return asked if asked <= 0 or gpus <= 0 else min(asked, gpus / max(1, actors))


def actor_pool(d: DataSpec, concurrent_pools: int) -> dict[str, Any]:
    """map_batches arguments for a model actor pool (`concurrent_pools` of them run at once)."""
    actors = concurrent_pools * d.num_actors
    per_actor = actor_cpus(cpus_after_a_node_loss(), actors)
    gpus = actor_gpus(d.num_gpus_per_actor, float(ray.cluster_resources().get("GPU", 0)), actors)
    return dict(compute=ray.data.ActorPoolStrategy(size=d.num_actors), batch_size=d.batch_size,
                num_cpus=per_actor, num_gpus=gpus, batch_format="pandas")


def destination(table: pa.Table) -> np.ndarray:
    """Where each row goes: quarantine, eval, dropped or train (in that precedence)."""
    out = np.full(table.num_rows, "train", dtype=object)
    out[valid(table, "drop")] = "dropped"
    out[equals(table, "split", "eval")] = "eval"
    out[valid(table, "reason")] = "quarantine"
    return out


def reference_lm(d: DataSpec, plan: Plan, ops: dict) -> dict[str, Any]:
    """The manifest's account of who scored the rows: the rule, and each reference LM's path and rows."""
    return {"rule": "reference_model" if d.reference_model else d.reference_lm,  # `scorer` indexes models
            "models": {n: {"path": p, "rows": int(ops.get(f"scored_by:{n}", [0, 0, 0])[1])}
                       for n, p in plan.references}}


def on_kept(fn, share: int | None = None):
    """A callable class applied to the kept (alive) rows of a batch only (of one reference LM's share,
    when given); the other rows pass through untouched, so pass 2 is one stream that carries every
    destination."""

    class KeptOnly(fn):
        def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
            kept = my_rows(df, share)
            if kept.all():
                return super().__call__(df)
            if not kept.any():
                return df
            done = super().__call__(df[kept].copy())
            out = pd.concat([done, df[~kept]]).loc[df.index]
            # Columns the class fills are NaN on the rows it skipped: None instead, or a text column holding
            # strings and floats reaches Arrow as pickled objects (and the next pool's rows could not join it).
            for c in out.columns:
                if out[c].dtype == object:
                    out[c] = out[c].where(out[c].notna(), None)
            return out

    KeptOnly.__name__ = fn.__name__
    return KeptOnly


class KeptCompressor(LMScorer):
    """Pass 2's compression of kept rows (when no reference LM ran in pass 1, or after a rewrite)."""

    def __init__(self, tally=None, name: str = "", **kwargs):
        super().__init__(**kwargs)
        self.tally, self.name = tally, name

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        out = super().__call__({c: df[c].to_numpy() for c in ("instruction", "input", "output")})
        for c in ("c_instruction", "c_input", "c_output", "prompt_tokens_before", "prompt_tokens_after"):
            if c in out:
                df[c] = out[c]
        if self.tally is not None:
            report(self.tally, f"scored_by:{self.name}", 0.0, len(df), len(df))
        return df
