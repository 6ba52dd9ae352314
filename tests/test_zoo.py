"""Tiny models from configs, and the demo zoo built end to end on the embedded cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from damoc.zoo.corpus import api_qa_rows, general_qa_rows, lookup_qa_rows, reading_comprehension_rows, split_rows
from damoc.zoo.tiny import FAMILIES

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_from_config_loads_and_generates(tiny_model, family):
    path = tiny_model(family, hidden=32, layers=2)
    assert {p.name for p in path.glob("*.safetensors")} == {"model.safetensors"}
    assert not list(path.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok("def main():", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == batch["input_ids"].shape[1] + 4
    assert sum(p.numel() for p in model.parameters()) < 200_000


def test_api_qa_rows_are_real_docstrings():
    rows = api_qa_rows(("json", "math"))
    by_source = {r["source"]: r for r in rows}
    assert by_source["json.dumps"]["instruction"] == "What does the Python function json.dumps do?"
    assert by_source["math.dist"]["output"] == "Return the Euclidean distance between two points p and q."
    train, evals = split_rows(rows, 0.2, seed=0)
    assert len(train) + len(evals) == len(rows) and not {r["source"] for r in train} & {r["source"] for r in evals}
    assert split_rows(rows, 0.2, seed=0) == (train, evals)


def test_wide_domain_sets_cover_methods_and_modules():
    api = {r["source"]: r for r in api_qa_rows(wide=True)}
    assert api["json.encoder.JSONEncoder.encode"]["instruction"] == (
        "What does the Python method json.encoder.JSONEncoder.encode do?")
    assert api["json.encoder.JSONEncoder.encode"]["input"] == "Signature: encode(self, o)"
    assert len(api) > 2 * len(api_qa_rows())  # a few thousand rows, as a user's domain set has
    general = {r["source"] for r in general_qa_rows(wide=True)}
    assert "shutil" in general and len(general) > len(general_qa_rows())
    assert len(reading_comprehension_rows(wide=True)) > 2 * len(reading_comprehension_rows())


def test_lookup_qa_answers_are_read_from_the_record():
    rows = lookup_qa_rows(n=200, seed=3)
    assert rows == lookup_qa_rows(n=200, seed=3) and rows != lookup_qa_rows(n=200, seed=4)
    for r in rows:
        record = dict(item.split(" = ") for item in r["input"].split("; "))
        assert len(record) == 6 and r["instruction"] == f"What number is {r['source']} set to?"
        assert record[r["source"]] == r["output"] and 100 <= int(r["output"]) < 1000
    assert len({r["output"] for r in rows}) > 100  # no answer a model could learn without reading the record


def test_general_qa_and_reading_comprehension_sets():
    general = {r["question"]: r for r in general_qa_rows()}
    assert general['In Python, what is the "assert" statement?']["answer"] == (
        "Assert statements are a convenient way to insert debugging assertions into a program.")
    assert general["What is the exception ZeroDivisionError in Python?"]["answer"].startswith("Second argument")
    assert len(general) > 400 and not any(r["answer"].startswith("New in version") for r in general.values())
    reading = reading_comprehension_rows()
    assert len(reading) > 300
    for r in reading:  # extractive: the answer is a span of the passage, the question asks for it
        assert r["answer"] in r["context"] and r["answer"] and r["question"].endswith("?")
    kinds = [r["question"].startswith("What does ") for r in reading]
    assert 0 < sum(kinds) < len(kinds)  # both question kinds occur


@pytest.mark.slow
def test_demo_zoo_build_then_demo_spec_validates(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    damoc = str(Path(sys.executable).parent / "damoc")
    r = subprocess.run([damoc, "zoo", "build", "--out", "zoo/demo", "--preset", "demo"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((tmp_path / "zoo/demo/zoo.json").read_text())
    assert [c["name"] for c in info["candidates"]] == ["gpt2-s", "llama-s", "neox-m"]
    for c in info["candidates"]:
        folder = tmp_path / "zoo/demo/models" / c["name"]
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert sum(p.numel() for p in model.parameters()) == c["params"]
        assert c["final_loss"] < 6.0  # pretraining moved it well below uniform (ln 1024 = 6.93)
    assert info["data"]["api_qa"]["train"] > 300
    from damoc.data.readers import plan_units, read_unit
    from damoc.spec import DataSource, Fields

    layouts = {"api_qa": ("train.jsonl", Fields()), "general_qa": ("train.json", Fields()),
               "reading_comprehension": ("train.parquet", Fields(instruction="question", input="context",
                                                                  output="answer"))}
    for name, (file, fields) in layouts.items():  # each set reads cleanly in its own layout
        units = plan_units(DataSource(path=str(tmp_path / "zoo/demo/data" / name / file)), str(tmp_path))
        rows = [r for u in units for r in read_unit(u, fields)]
        assert len(rows) == info["data"][name]["train"] > 200
        assert all(r["reason"] is None and r["instruction"] and r["output"] for r in rows), name
    again = subprocess.run([damoc, "zoo", "build", "--out", "zoo/demo"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 0 and "up to date" in again.stderr
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "demo.yaml").write_text((REPO / "jobs" / "demo.yaml").read_text())
    v = subprocess.run([damoc, "validate", "jobs/demo.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert v.returncode == 0, v.stderr
