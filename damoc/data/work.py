"""The data stage's work folder: every row of pass 1 with its stats, on disk, and the narrow columns
the driver keeps of it while the stream goes by.

Pass 1 is one Ray Data stream consumed by the driver: each batch is written to Parquet part files
(RUN/data/_work/scored/part-N.parquet) and its narrow columns (row order, status, the columns the
selectors declared) are kept in memory, integers and floats only: a million rows cost tens of MB.
Selectors then work on those arrays; the few that need wide columns (embeddings, signatures) read
them back from the part files, either for a handful of rows (`fetch`) or as a Ray Dataset that
spreads over the cluster (`dataset`). Nothing is collected whole.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

FILE_ROWS = 20_000  # rows per part file: the unit of parallel reads later
# Block work on wide columns below this size runs in the driver, block by block from the part files;
# above it, as a Ray Dataset spread over the cluster. Same blocks, same function: only where it runs.
LOCAL_BYTES = 64 << 20
ALIVE, QUARANTINED, EVAL, DROPPED = 0, 1, 2, 3  # row status after pass 1
BINARY = {"embedding", "mh_sig"}  # every other object column is text


def arrow_table(df: pd.DataFrame) -> pa.Table:
    """A batch as Arrow with fixed types for its object columns: a batch where a column is all null
    must not give that column the null type (the next batch could not be written beside it)."""
    return pa.Table.from_pandas(df, schema=pa.schema([pa.field(c, _arrow_type(c, df[c])) for c in df.columns]),
                                preserve_index=False)


def fix_types(table: pa.Table) -> pa.Table:
    """An Arrow batch with its all-null columns given their real type (text, or bytes for BINARY)."""
    if not any(pa.types.is_null(f.type) for f in table.schema):
        return table
    return table.cast(pa.schema([pa.field(f.name, (pa.binary() if f.name in BINARY else pa.string())
                                          if pa.types.is_null(f.type) else f.type) for f in table.schema]))


def _arrow_type(name: str, col: pd.Series) -> pa.DataType:
    if name in BINARY:
        return pa.binary()
    if pd.api.types.is_string_dtype(col.dtype):  # object or a pandas/Arrow string dtype
        return pa.string()
    try:
        return pa.from_numpy_dtype(col.dtype)
    except (TypeError, NotImplementedError):
        return pa.Array.from_pandas(col).type


class PartWriter:
    """Parquet part files of at most FILE_ROWS rows, written batch by batch with one schema."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.writer: pq.ParquetWriter | None = None
        self.schema: pa.Schema | None = None
        self.parts = self.rows_in_part = 0

    def write(self, table: pa.Table) -> None:
        if self.schema is None:
            self.schema = table.schema
        table = table.cast(self.schema)
        if self.writer is None or self.rows_in_part >= FILE_ROWS:
            self._roll()
        self.writer.write_table(table)
        self.rows_in_part += table.num_rows

    def _roll(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer = pq.ParquetWriter(self.folder / f"part-{self.parts:05d}.parquet", self.schema)
        self.parts, self.rows_in_part = self.parts + 1, 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def valid(table: pa.Table, column: str) -> np.ndarray:
    """Where a column is set (not null), as a numpy mask."""
    return pc.is_valid(table[column]).to_numpy(zero_copy_only=False)


def equals(table: pa.Table, column: str, value: str) -> np.ndarray:
    return pc.fill_null(pc.equal(table[column], value), False).to_numpy(zero_copy_only=False)


def status_of(table: pa.Table) -> np.ndarray:
    status = np.full(table.num_rows, ALIVE, dtype=np.int8)
    status[valid(table, "drop")] = DROPPED
    status[equals(table, "split", "eval")] = EVAL
    status[valid(table, "reason")] = QUARANTINED
    return status


class WorkRows:
    """Consumes pass 1 in the driver: writes every row to the part files, keeps the narrow columns."""

    def __init__(self, folder: Path, columns: list[str], embeddings: bool):
        self.parts = PartWriter(folder)
        self.folder, self.columns, self.embeddings = folder, columns, embeddings
        self._order: list[np.ndarray] = []
        self._status: list[np.ndarray] = []
        self._origin_eval: list[np.ndarray] = []
        self._narrow: list[pd.DataFrame] = []
        self.rowop_drops: dict[str, int] = {}
        # Embedding sums per reference LM's share (`scorer`): each model's space, and width, apart.
        self.emb_sums: dict[int, np.ndarray] = {}
        self.seconds = 0.0  # the driver's own time on the stream

    def add(self, table: pa.Table) -> None:
        """One batch of pass 1, as Arrow: the driver never turns the text into Python objects."""
        if table.num_rows == 0:
            return
        t0 = time.perf_counter()
        self._add(fix_types(table))
        self.seconds += time.perf_counter() - t0

    def _add(self, table: pa.Table) -> None:
        status = status_of(table)
        self._order.append(table["order"].to_numpy().astype(np.int64, copy=False))
        self._status.append(status)
        self._origin_eval.append(equals(table, "origin", "eval"))
        alive = pa.array(status == ALIVE)
        self._narrow.append(table.filter(alive).select(["order", *self.columns]).to_pandas())
        dropped = table.filter(pa.array(status == DROPPED))["drop"]
        for item in pc.value_counts(dropped).to_pylist():
            self.rowop_drops[item["values"]] = self.rowop_drops.get(item["values"], 0) + int(item["counts"])
        if self.embeddings and self._narrow[-1].shape[0]:
            rows = table.filter(alive)
            share = rows["scorer"].to_numpy()
            for k in np.unique(share):
                s = binary_matrix(rows.filter(pa.array(share == k))["embedding"]).sum(0)
                self.emb_sums[int(k)] = s + self.emb_sums[int(k)] if int(k) in self.emb_sums else s
        self.parts.write(table)

    def close(self) -> WorkData:
        self.parts.close()
        cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)  # noqa: E731
        narrow = (pd.concat(self._narrow, ignore_index=True) if self._narrow
                  else pd.DataFrame({c: [] for c in ["order", *self.columns]}))
        return WorkData(self.folder, cat(self._order, np.int64), cat(self._status, np.int8),
                        cat(self._origin_eval, bool), narrow, self.rowop_drops, self.emb_sums)


class WorkData:
    """What pass 1 left: the part files and, per row, its order, status and origin; the narrow
    columns of the rows still alive after the row operators."""

    def __init__(self, folder: Path, order: np.ndarray, status: np.ndarray, origin_eval: np.ndarray,
                 alive: pd.DataFrame, rowop_drops: dict[str, int], emb_sums: dict[int, np.ndarray]):
        self.folder, self.order, self.status, self.origin_eval = folder, order, status, origin_eval
        self.alive, self.rowop_drops, self.emb_sums = alive, rowop_drops, emb_sums
        self.spread = True  # False: the part files are on the driver's disk alone (a run on object storage)

    @property
    def files(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"))

    def fetch_table(self, orders, columns: list[str]) -> pa.Table:
        """Some rows' columns (signatures to verify, ids to name) as Arrow, read file by file."""
        wanted = np.unique(np.asarray(orders, dtype=np.int64))
        cols = ["order", *[c for c in columns if c != "order"]]
        out = []
        for f in self.files:
            t = pq.read_table(f, columns=cols)
            hit = np.isin(t["order"].to_numpy(), wanted)
            if hit.any():
                out.append(t.filter(pa.array(hit)))
        if not out:
            return pq.read_table(self.files[0], columns=cols).slice(0, 0) if self.files else pa.table({})
        return pa.concat_tables(out)

    def fetch(self, orders, columns: list[str]) -> pd.DataFrame:
        """`fetch_table` as pandas (a few rows)."""
        t = self.fetch_table(orders, columns)
        return t.to_pandas() if t.num_columns else pd.DataFrame({c: [] for c in ["order", *columns]})

    def column_bytes(self, columns: list[str]) -> float:
        """Uncompressed bytes per row of these columns, from the part files' metadata."""
        total = rows = 0
        for f in self.files:
            meta = pq.ParquetFile(f).metadata
            rows += meta.num_rows
            for g in range(meta.num_row_groups):
                rg = meta.row_group(g)
                total += sum(rg.column(j).total_uncompressed_size for j in range(rg.num_columns)
                             if rg.column(j).path_in_schema in columns)
        return total / max(1, rows)

    def map_blocks(self, columns: list[str], orders, fn, block_rows: int) -> pd.DataFrame:
        """`fn` on consecutive blocks of `block_rows` of these rows (their order and these columns), the
        results concatenated: in the driver when the columns are small, else on the cluster."""
        orders = np.asarray(orders, dtype=np.int64)
        if self.spread and self.column_bytes(columns) * len(orders) > LOCAL_BYTES:
            return gather(self.dataset(columns, orders).map_batches(fn, batch_format="pandas", batch_size=block_rows))
        wanted, buf, out = np.sort(orders), [], []
        for f in self.files:
            t = pq.read_table(f, columns=["order", *[c for c in columns if c != "order"]])
            hit = np.isin(t["order"].to_numpy(), wanted)
            if hit.any():
                buf.append(t.filter(pa.array(hit)).to_pandas())
            while sum(len(b) for b in buf) >= block_rows:
                block = pd.concat(buf, ignore_index=True)
                out.append(fn(block.iloc[:block_rows].reset_index(drop=True)))
                buf = [block.iloc[block_rows:].reset_index(drop=True)]
        rest = pd.concat(buf, ignore_index=True) if buf else pd.DataFrame()
        if len(rest):
            out.append(fn(rest))
        return pd.concat(out, ignore_index=True) if out else pd.DataFrame()

    def dataset(self, columns: list[str], orders):
        """A Ray Dataset of these rows' columns, read from the part files in parallel."""
        import ray
        import ray.data

        ref = ray.put(np.sort(np.asarray(orders, dtype=np.int64)))

        def keep(df: pd.DataFrame) -> pd.DataFrame:
            wanted = ray.get(ref)
            return df[np.isin(df["order"].to_numpy(), wanted)]

        cols = ["order", *[c for c in columns if c != "order"]]
        return ray.data.read_parquet([str(f) for f in self.files], columns=cols).map_batches(
            keep, batch_format="pandas", batch_size=4096)

    def mean_embedding(self, orders) -> np.ndarray:
        """Mean embedding of these rows (all of one reference LM's share): the sum pass 1 kept of that
        share's rows alive after the row operators, less the rows selectors dropped since (few: read back)."""
        orders = np.asarray(orders, dtype=np.int64)
        if not self.emb_sums or len(orders) == 0:
            return np.zeros(1, dtype=np.float32)
        alive, share = self.alive["order"].to_numpy(np.int64), self.alive["scorer"].to_numpy()
        ks = np.unique(share[np.isin(alive, orders)])
        if len(ks) != 1:
            raise ValueError(f"mean_embedding: rows of {len(ks)} reference LMs' shares (one space each)")
        gone = np.setdiff1d(alive[share == ks[0]], orders)
        total = self.emb_sums[int(ks[0])].astype(np.float64)
        if len(gone):
            for e in self.fetch(gone, ["embedding"])["embedding"]:
                total = total - np.frombuffer(e, dtype=np.float32)
        return (total / len(orders)).astype(np.float32)


def binary_matrix(column, dtype=np.float32) -> np.ndarray:
    """An Arrow binary column of equal-length vectors (embeddings, signatures) as a matrix, without a
    copy per row."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(column)
    if n == 0:
        return np.zeros((0, 1), dtype=dtype)
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[column.offset:column.offset + n + 1]
    data = np.frombuffer(column.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
    return data.view(dtype).reshape(n, -1)


def gather(ds) -> pd.DataFrame:
    """A (small) Ray Dataset's rows in the driver: per-block survivors, labels of narrow columns."""
    parts = list(ds.iter_batches(batch_format="pandas", batch_size=65536))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
