"""Bad input never crashes a reader and never loses a row: every non-blank line (JSONL), every
record (JSON, Parquet), every data row (CSV) comes out as exactly one row, normalised or
quarantined with its reason. Property-based: hypothesis writes the files."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from damoc.data.normalize import MAX_FIELD_CHARS, RAW_CHARS
from damoc.data.readers import plan_units, read_unit
from damoc.spec import DataSource, Fields

F = Fields()
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Values of every JSON type, nested a little: what a careless export puts in a field.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)
records = st.one_of(
    st.fixed_dictionaries({"instruction": json_values, "input": json_values, "output": json_values}),
    st.fixed_dictionaries({"conversations": st.lists(st.fixed_dictionaries(
        {"from": st.sampled_from(["human", "gpt", "system", "user", "x"]), "value": json_values}), max_size=4)}),
    st.fixed_dictionaries({"messages": json_values}),
    json_values,
)


def read_all(path: Path, chunk_bytes: int = 4 << 20) -> list[dict]:
    units = plan_units(DataSource(path=str(path)), str(path.parent), chunk_bytes=chunk_bytes)
    return [r for u in units for r in read_unit(u, F)]


def check_rows(rows: list[dict]) -> None:
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))  # each row once
    for r in rows:
        if r["reason"] is None:  # a kept row is a real sample
            assert r["instruction"].strip() and r["output"].strip()
            assert max(len(r[k]) for k in ("instruction", "input", "output")) <= MAX_FIELD_CHARS
        else:  # a quarantined one carries its reason and (bounded) raw text
            assert r["reason"] and len(r["raw"]) <= RAW_CHARS


@SETTINGS
@given(lines=st.lists(st.one_of(
    records.map(lambda r: json.dumps(r).encode()),
    records.map(lambda r: json.dumps(r).encode()[:-3]),          # truncated JSON
    st.binary(max_size=60).filter(lambda b: b"\n" not in b),     # random bytes, non-UTF-8 included
    st.just("{\"instruction\": \"q\", \"output\": \"é\"}".encode("latin-1")),
    st.just(b"{\"instruction\": \"q\", \"output\": \"" + b"x" * (MAX_FIELD_CHARS + 1) + b"\"}"),  # huge field
), max_size=25), bom=st.booleans(), chunk=st.integers(16, 400))
@example(lines=[b"\xef\xbb\xbf"], bom=False, chunk=16)  # a file that is only a BOM holds no line
def test_jsonl_any_bytes_every_line_accounted_for(tmp_path_factory, lines, bom, chunk):
    path = tmp_path_factory.mktemp("j") / "data.jsonl"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + b"\n".join(lines))
    rows = read_all(path, chunk_bytes=chunk)  # small byte ranges: lines cross unit boundaries
    body = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a leading BOM is the file's, whatever made it
    assert len(rows) == sum(1 for line in body.split(b"\n") if line.strip())
    check_rows(rows)


@SETTINGS
@given(recs=st.lists(records, max_size=20), wrap=st.booleans(), truncate=st.booleans())
def test_json_array_records_or_one_file_level_reason(tmp_path_factory, recs, wrap, truncate):
    path = tmp_path_factory.mktemp("a") / "data.json"
    text = json.dumps({"data": recs} if wrap else recs)
    path.write_text(text[: len(text) // 2] if truncate and recs else text, encoding="utf-8")
    rows = read_all(path)
    if truncate and recs:
        assert len(rows) == 1 and rows[0]["reason"].startswith("file is not valid JSON")
    else:
        assert len(rows) == len(recs)
    check_rows(rows)


@SETTINGS
@given(cells=st.lists(st.lists(st.text(max_size=30), min_size=1, max_size=5), max_size=20))
def test_csv_ragged_rows_are_quarantined_not_lost(tmp_path_factory, cells):
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["instruction", "input", "output"])
    writer.writerows(cells)
    path = tmp_path_factory.mktemp("c") / "data.csv"
    path.write_text(buf.getvalue(), encoding="utf-8")
    rows = read_all(path)
    data_rows = [c for c in cells if any(v.strip() for v in c)]
    assert len(rows) == len(data_rows) or any("CSV error" in (r["reason"] or "") for r in rows)
    check_rows(rows)


@SETTINGS
@given(recs=st.lists(st.fixed_dictionaries({"instruction": st.one_of(st.none(), st.text(max_size=20)),
                                            "output": st.one_of(st.none(), st.text(max_size=20))}), max_size=30))
def test_parquet_nulls_and_empties(tmp_path_factory, recs):
    path = tmp_path_factory.mktemp("p") / "data.parquet"
    pq.write_table(pa.Table.from_pylist(recs, schema=pa.schema([("instruction", pa.string()), ("output", pa.string())])),
                   path, row_group_size=7)
    rows = read_all(path)
    assert len(rows) == len(recs)
    check_rows(rows)


def test_empty_and_broken_files_are_rows_or_errors_never_crashes(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert read_all(tmp_path / "empty.jsonl") == []
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    rows = read_all(tmp_path / "broken.parquet")
    assert len(rows) == 1 and rows[0]["reason"].startswith("unreadable file")
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([{"instruction": "q", "output": "a"}]).encode())
    assert [r["reason"] for r in read_all(tmp_path / "bom.json")] == [None]
