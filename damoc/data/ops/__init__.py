"""Data operators, one per module, registered by name and built from the spec.

Two kinds:
- RowOp: runs inside the streaming pass on each batch; writes its stats as columns and
  sets `drop` (the reason) on the rows it rejects. Compute stats, then filter on them.
- Selector: a global choice over the surviving rows (dedup, coreset, budgeted ranking).
  It must not pull the corpus into one process: it works on the narrow columns it declared
  (kept by the driver as pass 1 streams by), reads wide ones back per block, and finishes on
  the survivors. Returns its drops: reasons indexed by row order.
Rows are never removed, only marked: every drop is in the output with its reason.
"""

from __future__ import annotations

import importlib
import time
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

OPERATORS: dict[str, type[Operator]] = {}
# Rows per pandas batch for CPU work. map_batches' default batch is a whole block, and blocks read
# back from a big file are the whole file: one task, one core, memory growing with the corpus.
BATCH_ROWS = 4096
MODULES = ("rules", "ifd_filter", "perplexity_filter", "minhash_dedup", "top_k", "k_center",
           "cluster_balance", "deita", "llm_judge")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Operator:
    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = Params
    needs_lm: ClassVar[bool] = False  # reads ce_cond / ce_alone / ifd / ppl
    needs_embedding: ClassVar[bool] = False
    budgeted: ClassVar[bool] = False  # applies data.filter.keep_ratio
    # A row operator with a model of its own runs on an actor pool of this class (see actor_kwargs).
    actor_class: ClassVar[type | None] = None

    def __init__(self, **params: Any):
        self.p = self.Params(**params)

    def actor_kwargs(self, resolve, tally) -> dict[str, Any]:
        """The actor class's constructor arguments; `resolve` turns a spec path into one every node
        can open (actors need not share the driver's working directory)."""
        return {"params": self.p.model_dump(), "tally": tally}


class RowOp(Operator):
    def apply(self, df: pd.DataFrame) -> pd.DataFrame:
        raise NotImplementedError


class Selector(Operator):
    # Columns `prepare` adds in the streaming pass (per-row work a selector would otherwise do in a
    # pass of its own); the selection reads them, and they never reach the outputs.
    prepared_columns: ClassVar[tuple[str, ...]] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        """Narrow columns (numbers) the driver keeps of every alive row for `select`."""
        return ()

    def prepare(self, df: pd.DataFrame) -> pd.DataFrame:
        """Per-batch columns for `select`, computed for alive rows (the others get nulls)."""
        return df

    def select(self, alive: pd.DataFrame, budget: int | None, ctx: SelectContext) -> pd.Series:
        """Drops among the rows still alive: a Series of reasons indexed by row order (`dropped`).
        `alive` holds their `order` and the declared `columns`; wide columns come from `ctx.work`."""
        raise NotImplementedError


class SelectContext:
    """What a selector may use: the seed, the model-pool batch size and the work folder (`fetch` a few
    rows' wide columns, or a Ray `dataset` of many)."""

    def __init__(self, seed: int, batch_size: int, work=None):
        self.seed, self.batch_size, self.work = seed, batch_size, work


def dropped(orders, reason) -> pd.Series:
    """A selector's drops: reasons (one for all, or one per row) indexed by row order. A Series of a
    repeated string holds references, not copies: a million drops cost a few MB in the driver."""
    orders = np.asarray(orders, dtype=np.int64)
    return pd.Series(reason if not isinstance(reason, str) else [reason] * len(orders),
                     index=pd.Index(orders, name="order"), dtype=object)


def register(cls: type[Operator]) -> type[Operator]:
    OPERATORS[cls.name] = cls
    return cls


def get_operator(name: str) -> type[Operator]:
    # Import every operator module, not just "when the registry is empty": a module imported
    # directly elsewhere would otherwise hide all the others.
    for m in MODULES:
        importlib.import_module(f"damoc.data.ops.{m}")
    if name not in OPERATORS:
        raise ValueError(f"unknown data operator '{name}'; known: {', '.join(sorted(OPERATORS))}")
    return OPERATORS[name]


# What `filter.method` means when the spec lists no operators explicitly.
DEFAULT_CHAINS: dict[str, list[tuple[str, dict]]] = {
    "none": [],
    "distribution": [("minhash_dedup", {}), ("k_center", {})],
    "quality": [("rules", {}), ("ifd_filter", {}), ("top_k", {"score": "ifd"})],
    "hybrid": [("rules", {}), ("ifd_filter", {}), ("minhash_dedup", {}), ("deita", {"score": "ifd"})],
}


def build_chain(data) -> list[Operator]:
    """The operators of the spec's `data.filter` (a DataSpec), in order: the data stage runs them and
    `damoc plan` reads what they need (the reference LM, a row budget)."""
    steps = ([(o.name, o.params) for o in data.filter.operators] if data.filter.operators is not None
             else DEFAULT_CHAINS[data.filter.method])
    return [get_operator(name)(**params) for name, params in steps]


def alive_mask(df: pd.DataFrame) -> np.ndarray:
    """Training rows that were read fine and nothing has dropped yet."""
    return (df["reason"].isna() & df["drop"].isna() & (df["split"] == "train")).to_numpy()


def mark(df: pd.DataFrame, rows: np.ndarray, reason: str) -> None:
    df.loc[rows & df["drop"].isna().to_numpy(), "drop"] = reason


def report(tally, name: str, seconds: float, n_in: int, n_out: int) -> None:
    """Tell the stage's tally what a batch cost. Waits for the acknowledgement: Ray Data ends
    pools and tasks before fire-and-forget calls are delivered, and the figures were lost."""
    import ray

    ray.get(tally.add.remote(name, seconds, n_in, n_out))


class Steps:
    """Consecutive streamed steps (row operators' `apply`, selectors' `prepare`) in one map_batches call:
    one batch conversion instead of one per step, one report to the tally per batch. Steps named
    None are bookkeeping (tags, the eval split) and are not reported."""

    def __init__(self, steps: list[tuple[str | None, object]], tally):
        self.steps, self.tally = steps, tally

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        timings = []
        for name, fn in self.steps:
            n_in = int(alive_mask(df).sum()) if name else 0
            t0 = time.perf_counter()
            df = fn(df)
            if name:
                timings.append((name, time.perf_counter() - t0, n_in, int(alive_mask(df).sum())))
        if timings and self.tally is not None:
            import ray

            ray.get(self.tally.add_many.remote(timings))
        return df


def embeddings(values) -> np.ndarray:
    """The `embedding` column (float32 bytes: a plain Arrow binary, never a pickle) as a matrix."""
    return np.stack([np.frombuffer(v, dtype=np.float32) for v in values])

