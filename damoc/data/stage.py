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

import functools
import json
import logging
import shutil
import time
from collections import Counter
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
from damoc.data.lm import (
    CompressArgs,
    LMScorer,
    count_tokens,
    field_text,
    loadable,
    row_key,
    shares,
    smallest_model,
    unit_hash,
)
from damoc.data.ops import (
    BATCH_ROWS,
    Operator,
    RowOp,
    SelectContext,
    Selector,
    Steps,
    alive_mask,
    build_chain,
    report,
)
from damoc.data.readers import read_rows
from damoc.data.rewrite import Rewriter
from damoc.data.work import ALIVE, DROPPED, EVAL, QUARANTINED, WorkData, WorkRows, equals, fix_types, valid
from damoc.lm.load import load_tokenizer
from damoc.pipeline import Stage, StageContext, register_stage
from damoc import records
from damoc.runtime import on_head_node
from damoc.schedule import row_budget
from damoc.spec import DataSpec, JobSpec

log = logging.getLogger("damoc.data")

TEXT_COLUMNS = ["id", "source", "instruction", "input", "output"]
STATS_COLUMNS = ("chars", "repetition", "special_ratio", "scorer", "ce_cond", "ce_alone", "ifd", "ppl", "judge")
TOKEN_COLUMNS = ("prompt_tokens_before", "prompt_tokens_after", "rewrite_rounds")
EVAL_ORDER = 1 << 62  # eval-source rows are ordered after every training row
EXAMPLES = 5  # before/after rows kept for the report


def _rss_mib() -> str:
    import psutil

    m = psutil.Process().memory_full_info()
    return f"{m.rss / 2**20:.0f} (private {m.uss / 2**20:.0f})"


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


class NoRowsLeft(ValueError):
    """Nothing to train on: every row was quarantined or dropped."""


def no_rows_reason(manifest: dict[str, Any], quarantine: Path) -> str:
    """Why no row was kept, in a sentence: the commonest quarantine reasons, or the drops."""
    if manifest["quarantined"] == manifest["input"]:
        reasons = Counter()
        with open(quarantine, encoding="utf-8") as fh:
            for line in fh:
                reasons[json.loads(line)["reason"]] += 1
        top = "; ".join(f"{r} ({n} rows)" for r, n in reasons.most_common(3))
        return (f"no readable rows: all {manifest['input']} rows of data.train were quarantined ({top}); "
                "check data.fields against the file's columns")
    drops = ", ".join(f"{k}: {v}" for k, v in manifest["dropped"].items())
    return (f"no rows kept: {manifest['quarantined']} quarantined and every readable row dropped ({drops}); "
            "loosen data.filter")


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


def split_budget(budget: int, sizes: list[int]) -> list[int]:
    """A row budget over groups in proportion to their sizes (largest remainders; they add up)."""
    total = sum(sizes)
    if total == 0:
        return [0] * len(sizes)
    exact = [budget * n / total for n in sizes]
    parts = [int(e) for e in exact]
    for i in sorted(range(len(sizes)), key=lambda i: (parts[i] - exact[i], i))[: budget - sum(parts)]:
        parts[i] += 1
    return parts


def by_share(sel: Selector, alive: pd.DataFrame, budget: int | None, sctx: SelectContext) -> pd.Series:
    """A selector that reads a model's stats, run within each reference LM's share on that LM's stats
    and embeddings (never compared across models), with the budget split by the shares' sizes."""
    groups = [alive[alive["scorer"].to_numpy() == k] for k in sorted(set(alive["scorer"].tolist()))]
    budgets = split_budget(budget, [len(g) for g in groups]) if budget is not None else [None] * len(groups)
    parts = [sel.select(g.reset_index(drop=True), b, sctx) for g, b in zip(groups, budgets)]
    return pd.concat(parts) if parts else pd.Series([], dtype=object)


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


class ParquetSink:
    """One Parquet file written batch by batch (the contract names a file, not a folder)."""

    def __init__(self, path: Path, columns: list[str], ints: tuple[str, ...] = ()):
        self.path, self.columns, self.ints = path, columns, ints
        self.writer, self.rows = None, 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        table = table.select([c for c in self.columns if c in table.column_names])
        for c in self.ints:
            if c in table.column_names:
                table = table.set_column(table.schema.get_field_index(c), c, table[c].cast(pa.int64()))
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema)
        self.writer.write_table(table.cast(self.writer.schema))
        self.rows += table.num_rows

    def close(self) -> int:
        if self.writer is not None:
            self.writer.close()
        else:
            pq.write_table(pa.table({c: pa.array([], pa.string()) for c in TEXT_COLUMNS}), self.path)
        return self.rows


def quarantine_lines(table: pa.Table) -> str:
    return "".join(json.dumps({"id": r["id"], "source": r["source"], "split": r["origin"], "reason": r["reason"],
                               "raw": r["raw"]}, ensure_ascii=False) + "\n"
                   for r in table.select(["id", "source", "origin", "reason", "raw"]).to_pylist())


def budget_note(keep_ratio: float, budget: int | None, kept: int, dropped: dict[str, int], plan) -> str | None:
    """Why fewer rows than keep_ratio asked for were kept: the drops that are not the budget's own, the
    largest first, with the operator that made them."""
    if budget is None or kept >= budget:
        return None
    budget_reasons = ("below_budget", "not_selected", "over_share")
    others = sorted(((k, n) for k, n in dropped.items() if k != "held_out_eval"
                     and not any(b in k for b in budget_reasons)), key=lambda kv: -kv[1])
    names = {op.name: op for op in plan.chain}
    culprit = ", ".join(f"{k} dropped {n:,d} ({owner(k, names)})" for k, n in others[:3]) or "no operator"
    return (f"keep_ratio {keep_ratio:g} asked for {budget:,d} rows but {kept:,d} were kept: {culprit} before "
            "the budget applied")


def owner(reason: str, operators: dict) -> str:
    """The operator a drop reason comes from."""
    prefix = {"ifd>": "ifd_filter", "near_duplicate": "minhash_dedup", "judge<": "llm_judge", "perplexity>":
              "perplexity_filter", "rules:": "rules"}
    for p, name in prefix.items():
        if reason.startswith(p):
            return name
    return reason.split(":", 1)[0] if reason.split(":", 1)[0] in operators else "an operator"


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


@dataclass
class Routed:
    """Pass 2's counts."""

    written: dict[str, int]
    tokens_before: int = 0
    tokens_after: int = 0
    drop_reasons: dict[str, int] = field(default_factory=dict)
    eval_quarantined: int = 0
    eval_input: int = 0
    rounds: list[np.ndarray] = field(default_factory=list)
    rewrite_rounds: list[dict[str, Any]] = field(default_factory=list)  # per round: proposed, accepted, refused
    examples: dict[str, list[dict[str, str]]] = field(default_factory=lambda: {"compress": [], "rewrite": []})

    def note_rewrites(self, logs: list[str], after: list[dict[str, str]]) -> None:
        """Per-round acceptance and refusal reasons, and a few rows before and after."""
        for text, row in zip(logs, after):
            log_ = json.loads(text)
            for r, outcome in enumerate(log_["outcomes"]):
                while len(self.rewrite_rounds) <= r:
                    self.rewrite_rounds.append({"round": len(self.rewrite_rounds) + 1, "proposed": 0, "accepted": 0,
                                                "refused": {}})
                stats = self.rewrite_rounds[r]
                stats["proposed"] += 1
                if outcome == "accepted":
                    stats["accepted"] += 1
                else:
                    stats["refused"][outcome] = stats["refused"].get(outcome, 0) + 1
            if "accepted" in log_["outcomes"] and len(self.examples["rewrite"]) < EXAMPLES:
                self.examples["rewrite"].append({"before": log_["before"], "after": row})


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
