"""Readers: a data source -> a stream of normalised or quarantined rows, on Ray Data.

Work is cut into read units (a byte range of a JSONL file, a Parquet row group, a whole
JSON or CSV file) so that a large corpus streams through many small tasks. Each row gets a
stable id from where it was read (`file:byte-offset`, `file:row`), so ids are unique even
when rows repeat, and a bad line is quarantined alone with its reason.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from damoc.data.normalize import quarantined, row
from damoc.spec import DataSource, Fields, resolve_path

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
CHUNK_BYTES = 4 << 20


class SourceError(ValueError):
    """The source itself cannot be read (not a row problem)."""


def source_files(source: DataSource, base_dir: str) -> list[tuple[Path, str]]:
    root = Path(resolve_path(source.path, base_dir))
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS)
        if not files:
            raise SourceError(f"{root}: no {', '.join(FORMATS)} files in this folder")
    elif root.is_file():
        files = [root]
    else:
        raise SourceError(f"{root}: no such file")
    out = []
    for f in files:
        fmt = source.format if source.format != "auto" else FORMATS.get(f.suffix.lower())
        if fmt is None:
            raise SourceError(f"{f}: cannot tell the format from the name; set 'format'")
        out.append((f, fmt))
    return out


def plan_units(source: DataSource, base_dir: str, chunk_bytes: int = CHUNK_BYTES) -> list[dict[str, Any]]:
    """The read units of a local source, in a stable order."""
    units: list[dict[str, Any]] = []
    for path, fmt in source_files(source, base_dir):
        if fmt == "jsonl":
            size = path.stat().st_size
            for start in range(0, max(size, 1), chunk_bytes):
                units.append({"path": str(path), "format": fmt, "start": start, "end": min(size, start + chunk_bytes)})
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            try:
                groups = pq.ParquetFile(path).num_row_groups
            except Exception as exc:  # noqa: BLE001 - a corrupt file is one bad source, reported as such
                units.append({"path": str(path), "format": "broken", "start": 0, "end": 0, "error": str(exc)})
                continue
            units += [{"path": str(path), "format": fmt, "start": g, "end": g + 1} for g in range(groups)]
        else:
            units.append({"path": str(path), "format": fmt, "start": 0, "end": -1})
    return units


def _jsonl_range(unit: dict, fields: Fields) -> list[dict]:
    """Lines that *start* in [start, end): a line crossing the boundary belongs to its start."""
    path, start, end = unit["path"], unit["start"], unit["end"]
    stem = Path(path).name
    out = []
    with open(path, "rb") as fh:
        if start > 0:
            fh.seek(start - 1)
            if fh.read(1) != b"\n":
                fh.readline()  # finish the line the previous unit owns
        while True:
            offset = fh.tell()
            if offset >= end > 0:
                break
            line = fh.readline()
            if not line:
                break
            if offset == 0 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if not line.strip():
                continue  # a blank line is not a row
            rid = f"{stem}:{offset}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                out.append(quarantined(rid, path, f"not valid UTF-8 ({exc.reason} at byte {exc.start})",
                                       line.decode("utf-8", "replace")))
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                out.append(quarantined(rid, path, f"malformed JSON: {exc.msg} (column {exc.colno})", text))
                continue
            out.append(row(rid, path, record, fields))
    return out


def _json_file(unit: dict, fields: Fields) -> list[dict]:
    path = unit["path"]
    stem = Path(path).name
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [quarantined(f"{stem}:file", path, f"file is not valid JSON: {exc}", "")]
    data = _unwrap(data)
    if not isinstance(data, list):
        return [quarantined(f"{stem}:file", path, f"JSON file holds a {type(data).__name__}, not rows", data)]
    return [row(f"{stem}:{i}", path, rec, fields) for i, rec in enumerate(data)]


def _unwrap(data: Any) -> Any:
    """The rows of {"data": [...]} and similar one-list wrappers; a lone object is one row."""
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    return data


def _csv_file(unit: dict, fields: Fields) -> list[dict]:
    path = unit["path"]
    stem = Path(path).name
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return [quarantined(f"{stem}:file", path, f"file is not valid UTF-8: {exc}", "")]
    out = []
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except (StopIteration, csv.Error):
        return out
    try:
        for values in reader:
            rid = f"{stem}:{reader.line_num}"
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                out.append(quarantined(rid, path, f"CSV row has {len(values)} fields, header has {len(header)}",
                                       ",".join(values)))
                continue
            out.append(row(rid, path, dict(zip(header, values)), fields))
    except csv.Error as exc:
        out.append(quarantined(f"{stem}:{reader.line_num}", path, f"CSV error: {exc}; rest of file unread", ""))
    return out


def _parquet_group(unit: dict, fields: Fields) -> list[dict]:
    import pyarrow.parquet as pq

    path, g = unit["path"], unit["start"]
    stem = Path(path).name
    table = pq.ParquetFile(path).read_row_group(g)
    return [row(f"{stem}:{g}:{i}", path, rec, fields) for i, rec in enumerate(table.to_pylist())]


def read_unit(unit: dict, fields: Fields) -> list[dict]:
    if unit["format"] == "broken":
        return [quarantined(f"{Path(unit['path']).name}:file", unit["path"],
                            f"unreadable file: {unit.get('error', '')}", "")]
    reader = {"jsonl": _jsonl_range, "json": _json_file, "csv": _csv_file, "parquet": _parquet_group}
    return reader[unit["format"]](unit, fields)


def row_schema():
    """The columns every read unit yields (pyarrow is imported where rows are built)."""
    import pyarrow as pa

    return pa.schema([(c, pa.string()) for c in ("id", "source", "instruction", "input", "output", "reason", "raw")]
                     + [("order", pa.int64())])


def read_rows(source: DataSource, fields: Fields, base_dir: str, post=None):
    """A Ray Dataset of normalised rows (reason=None) and quarantined rows (reason set). `post`, a
    function of a pandas batch, runs inside each read task: the stage's CPU steps ride with the read
    instead of being a second operator (which Ray Data would give only its share of the CPUs)."""
    import ray.data

    if source.hf:
        ds = _read_hf(source, fields)
        return ds if post is None else ds.map_batches(post, batch_format="pandas", batch_size=4096)
    units = plan_units(source, base_dir)
    for i, unit in enumerate(units):
        unit["index"] = i
    return ray.data.read_datasource(_units_datasource()(units, fields, post))


def _units_datasource():
    """Defined on first use so that importing the readers does not import Ray Data."""
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class Units(Datasource):
        """One read task per unit. (A `from_items` of units followed by map_batches let Ray Data
        bundle all the units into one task, to fill the downstream batch size: one core did it all.)"""

        def __init__(self, units: list[dict], fields: Fields, post=None):
            self.units, self.fields, self.post = units, fields, post

        def estimate_inmemory_data_size(self) -> int:
            return sum(max(0, u["end"] - u["start"]) for u in self.units if u["format"] == "jsonl")

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
            fields, post = self.fields, self.post

            def read(u: dict):
                table = units_table([u], fields)
                if post is None:
                    return [table]
                from damoc.data.work import arrow_table

                return [arrow_table(post(table.to_pandas()))]

            return [ReadTask(lambda u=u: read(u),
                             BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None,
                                           input_files=(u["path"],)),
                             schema=row_schema() if post is None else None, per_task_row_limit=per_task_row_limit)
                    for u in self.units]

    return Units


def units_table(units: list[dict], fields: Fields):
    """The rows of some read units as one Arrow table with a fixed schema (column-wise: several
    times cheaper for Ray Data than one dict per row)."""
    import pyarrow as pa

    rows = [r for unit in units for r in read_unit_ordered(unit, fields)]
    schema = row_schema()
    return pa.Table.from_pydict({c: [r[c] for r in rows] for c in schema.names}, schema=schema)


def read_unit_ordered(unit: dict, fields: Fields) -> list[dict]:
    """Rows of a unit with `order`: their position in the whole source (for stable tie-breaks)."""
    rows = read_unit(unit, fields)
    for j, r in enumerate(rows):
        r["order"] = (unit["index"] << 32) + j
    return rows


def _read_hf(source: DataSource, fields: Fields):
    """A Hugging Face dataset by name and split (token from HF_TOKEN in the environment)."""
    import datasets
    import ray.data

    hf = datasets.load_dataset(source.hf, source.config, split=source.split, revision=source.revision,
                               data_files=source.data_files, token=os.environ.get("HF_TOKEN") or None)
    hf = hf.map(lambda _, i: {"__row": i}, with_indices=True)
    name = f"{source.hf}:{source.split}"
    def convert(rec: dict) -> dict:
        i = rec.pop("__row")
        return {**row(f"{name}:{i}", name, rec, fields), "order": i}

    return ray.data.from_huggingface(hf).map(convert)


def sample_records(source: DataSource, base_dir: str, n: int = 200) -> tuple[str, list[dict]]:
    """The first `n` records of a local source as the user wrote them (before the field mapping), for
    checks that must run before any cluster work. Unparseable lines are skipped: the reader
    quarantines them later with their reason."""
    path, fmt = source_files(source, base_dir)[0]
    records: list[Any] = []
    if fmt == "jsonl":
        with open(path, "rb") as fh:
            for line in fh:
                if len(records) >= n:
                    break
                try:
                    records.append(json.loads(line.decode("utf-8-sig")))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    continue
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        f = pq.ParquetFile(path)
        records = f.read_row_group(0).slice(0, n).to_pylist() if f.num_row_groups else []
    elif fmt == "csv":
        with open(path, encoding="utf-8-sig", newline="") as fh:
            records = [r for _, r in zip(range(n), csv.DictReader(fh))]
    else:
        try:
            data = _unwrap(json.loads(Path(path).read_bytes().decode("utf-8-sig")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            data = []
        records = data[:n] if isinstance(data, list) else []
    return str(path), [r for r in records if isinstance(r, dict)]
