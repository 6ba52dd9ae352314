"""Data operators, one per module, registered by name and built from the spec.

Two kinds:
- RowOp: runs inside the streaming pass on each batch; writes its stats as columns and
  sets `drop` (the reason) on the rows it rejects. Compute stats, then filter on them.
- Selector: a global choice over the surviving rows (dedup, coreset, budgeted ranking).
  It must not pull the corpus into one process: it reads narrow columns, preselects
  per block, and finishes on the survivors. Returns {row id: drop reason}.
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
# Rows per pandas batch for CPU work, and per file for intermediates. map_batches' default batch
# is a whole block, and blocks read back from a big file are the whole file: one task, one core,
# memory growing with the corpus.
BATCH_ROWS = 4096
FILE_ROWS = 20_000
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

    def __init__(self, **params: Any):
        self.p = self.Params(**params)


class RowOp(Operator):
    def apply(self, df: pd.DataFrame) -> pd.DataFrame:
        raise NotImplementedError


class Selector(Operator):
    # Columns `prepare` adds in the streaming pass (per-row work a selector would otherwise do in a
    # pass of its own); the selection reads them, and they never reach the outputs.
    prepared_columns: ClassVar[tuple[str, ...]] = ()

    def prepare(self, df: pd.DataFrame) -> pd.DataFrame:
        """Per-batch columns for `select`, computed for alive rows (the others get nulls)."""
        return df

    def select(self, alive, budget: int | None, ctx: SelectContext) -> dict[str, str]:
        raise NotImplementedError


class SelectContext:
    """What a selector may use: the seed, the alive row count, the actor pool settings, and a
    work folder for intermediate columns (on disk, so memory stays flat as the corpus grows)."""

    def __init__(self, seed: int, n_alive: int, batch_size: int, work_dir: str | None = None):
        self.seed, self.n_alive, self.batch_size = seed, n_alive, batch_size
        self.work_dir = work_dir
        self._spills = 0

    def spill(self, ds):
        """Write a dataset to the work folder and read it back: a reusable intermediate that lives
        on disk instead of in the object store (`materialize()` when there is no work folder)."""
        if self.work_dir is None:
            return ds.materialize()
        import ray.data

        self._spills += 1
        path = f"{self.work_dir}/spill-{self._spills}"
        ds.write_parquet(path, max_rows_per_file=FILE_ROWS)
        return ray.data.read_parquet(path)


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


class Timed:
    """Per-batch wrapper for a streamed step (a RowOp's `apply`, a Selector's `prepare`) that reports
    seconds and alive rows in/out to the stage's tally under `name`."""

    def __init__(self, name: str, fn, tally):
        self.name, self.fn, self.tally = name, fn, tally

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        n_in = int(alive_mask(df).sum())
        t0 = time.perf_counter()
        df = self.fn(df)
        report(self.tally, self.name, time.perf_counter() - t0, n_in, int(alive_mask(df).sum()))
        return df


def embeddings(values) -> np.ndarray:
    """The `embedding` column (float32 bytes: a plain Arrow binary, never a pickle) as a matrix."""
    return np.stack([np.frombuffer(v, dtype=np.float32) for v in values])


def keep_where(ds, mask):
    """Rows of a dataset where `mask(batch) -> bool array` holds: vectorised per batch, where a
    row-wise `Dataset.filter(fn)` would turn every row into a dict first."""
    return ds.map_batches(lambda df: df[np.asarray(mask(df), dtype=bool)], batch_format="pandas",
                          batch_size=BATCH_ROWS)


def collect(ds, columns: list[str]) -> dict[str, np.ndarray]:
    """Narrow columns of a dataset into the driver, batch by batch."""
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for batch in ds.select_columns(columns).iter_batches(batch_format="numpy", batch_size=65536):
        for c in columns:
            parts[c].append(batch[c])
    return {c: (np.concatenate(v) if v else np.zeros(0)) for c, v in parts.items()}


def mean_embedding(ds) -> np.ndarray:
    """The mean of the `embedding` column, from per-batch sums (one streaming pass)."""

    def part(df: pd.DataFrame) -> pd.DataFrame:
        e = embeddings(df["embedding"])
        return pd.DataFrame({"sum": [e.sum(0)], "n": [len(e)]})

    got = collect(ds.select_columns(["embedding"]).map_batches(part, batch_format="pandas", batch_size=BATCH_ROWS),
                  ["sum", "n"])
    return np.stack(got["sum"]).sum(0) / max(1, int(got["n"].sum())) if len(got["n"]) else np.zeros(1)
