"""Readers and normalisation: every line becomes a row or a quarantined row with its reason."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from damoc.data.normalize import normalize_record
from damoc.data.readers import SourceError, plan_units, read_unit
from damoc.spec import DataSource, Fields

F = Fields()


def read_all(path, chunk_bytes=4 << 20, fields=F):
    units = plan_units(DataSource(path=str(path)), str(path.parent), chunk_bytes=chunk_bytes)
    return [r for u in units for r in read_unit(u, fields)]


def test_jsonl_bad_lines_are_quarantined_with_reasons(tmp_path):
    lines = [
        b'\xef\xbb\xbf{"instruction": "q1", "output": "a1"}',  # BOM on the first line
        b'{"instruction": "q2", "output": "a2"',  # truncated
        b"",  # blank: not a row
        b'{"instruction": "q3", "output": "\xff\xfe"}',  # not UTF-8
        b'{"instruction": "q4"}',  # no answer
        b'{"instruction": ["q5"], "output": "a5"}',  # wrong type
        b"[1, 2]",  # not an object
        b'{"instruction": "q6", "input": 7, "output": 8}',  # numbers are text enough
    ]
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    rows = read_all(path)
    reasons = [r["reason"] for r in rows]
    assert len(rows) == 7 and len({r["id"] for r in rows}) == 7
    assert reasons[0] is None and rows[0]["instruction"] == "q1"
    assert reasons[1].startswith("malformed JSON")
    assert reasons[2].startswith("not valid UTF-8")
    assert reasons[3] == "no answer (field 'output' missing or null)"
    assert reasons[4] == "field 'instruction' is not text (list)"
    assert reasons[5] == "record is not an object (list)"
    assert reasons[6] is None and rows[6]["input"] == "7" and rows[6]["output"] == "8"
    assert rows[1]["raw"].startswith('{"instruction": "q2"')


def test_byte_ranges_read_every_line_exactly_once(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"question {i}" + "x" * (i % 17), "output": str(i)}) + "\n"
                            for i in range(300)))
    whole = read_all(path)
    for chunk in (7, 50, 333, 4096):
        split = read_all(path, chunk_bytes=chunk)
        assert [r["id"] for r in split] == [r["id"] for r in whole]
    assert [r["output"] for r in whole] == [str(i) for i in range(300)]


def test_json_array_csv_parquet_and_folder(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps({"data": [{"q": "a?", "a": "A"}, {"q": "b?"}]}))
    (folder / "b.csv").write_text('q,a\n"c, with comma?",C\nd?,D,extra\n\ne?,E\n')
    pq.write_table(pa.table({"q": ["f?", "g?"], "a": ["F", None]}), folder / "c.parquet")
    (folder / "README.md").write_text("not data")
    fields = Fields(instruction="q", input=None, output="a")
    units = plan_units(DataSource(path=str(folder)), str(tmp_path))
    rows = [r for u in units for r in read_unit(u, fields)]
    ok = [r["instruction"] for r in rows if r["reason"] is None]
    bad = [(r["id"], r["reason"]) for r in rows if r["reason"]]
    assert ok == ["a?", "c, with comma?", "e?", "f?"]
    assert [(i, r.split(" (field")[0]) for i, r in bad] == [
        ("a.json:1", "no answer"), ("b.csv:3", "CSV row has 3 fields, header has 2"), ("c.parquet:0:1", "no answer")]


def test_sharegpt_and_alpaca_layouts():
    conv = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"},
                              {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "More?"}]}
    assert normalize_record(conv, F) == {"instruction": "Hi?", "input": "Be brief.", "output": "Hello."}
    msgs = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    assert normalize_record(msgs, F) == {"instruction": "2+2?", "input": "", "output": "4"}
    mapped = Fields(instruction="question", input="context", output="answer")
    assert normalize_record({"question": "Q", "context": "C", "answer": "A"}, mapped) == {
        "instruction": "Q", "input": "C", "output": "A"}
    squad = Fields(instruction="question", input="context", output="answers.text.0")  # nested, as on the hub
    rec = {"question": "Who?", "context": "Ada wrote it.", "answers": {"text": ["Ada"], "answer_start": [0]}}
    assert normalize_record(rec, squad) == {"instruction": "Who?", "input": "Ada wrote it.", "output": "Ada"}
    with pytest.raises(ValueError, match="no answer"):
        normalize_record({**rec, "answers": {"text": [], "answer_start": []}}, squad)


def test_unreadable_sources_are_errors_not_rows(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        plan_units(DataSource(path=str(tmp_path / "nope.jsonl")), str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no .jsonl"):
        plan_units(DataSource(path=str(tmp_path / "empty")), str(tmp_path))
