"""The data stage end to end on the embedded cluster: counts conserve, drops are explained."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from conftest import spec_dict
from datagen import write_corpus

from damoc.data.selection import split_budget
from damoc.data.stream import actor_cpus, actor_gpus
from damoc.pipeline import Pipeline, read_marker
from damoc.runtime import connect
from damoc.spec import spec_from_data

import damoc.data.stage  # noqa: F401  (registers the stage)


@pytest.fixture(autouse=True)
def _no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def run_data(job_dir, resume=False, cpus=2, **overrides):
    spec = spec_from_data(spec_dict(**overrides), base_dir=str(job_dir))
    p = Pipeline(spec, base_dir=job_dir, runtime_factory=lambda: connect(None, num_cpus=cpus))
    out = p.run(["data"], resume=resume)
    return out[0], p.run_dir / "data"


def manifest(data_dir):
    return json.loads((data_dir / "manifest.json").read_text())


def ids(path):
    return set(pq.read_table(path, columns=["id"])["id"].to_pylist())


def conserves(m):
    return m["input"] == m["kept"] + m["quarantined"] + sum(m["dropped"].values())


def test_quality_chain_then_none_with_resume(job_dir, tiny_model):
    planted = write_corpus(job_dir / "data" / "corpus.jsonl", 150, malformed=0.05, dups=0.05, seed=3)
    common = {"data.train.path": "data/corpus.jsonl", "data.eval": {"split_ratio": 0.1},
              "data.reference_model": str(tiny_model("llama")), "data.batch_size": 32}
    chain = [{"name": "rules"}, {"name": "llm_judge", "params": {"model": "zoo/llama-s"}},
             {"name": "ifd_filter"}, {"name": "top_k", "params": {"score": "ifd"}}]
    outcome, data = run_data(job_dir, **common, **{"data.filter": {"keep_ratio": 0.3, "operators": chain},
                                                  "data.compress": {"ratio": 0.5}})
    m = manifest(data)
    assert outcome.status == "ran" and conserves(m)
    assert m["dropped"]["held_out_eval"] == len(ids(data / "eval.parquet")) > 0
    c = outcome.counts  # the summary line: kept, quarantined, dropped and eval add up to the input
    assert c["kept"] + c["quarantined"] + c["dropped"] + c["eval"] == c["input"] == m["input"]
    assert m["kept"] == m["budget"] == round(0.3 * m["readable"]) == len(ids(data / "train.parquet"))
    assert set(m["dropped"]) <= {"held_out_eval", "ifd>1", "top_k:below_budget(ifd)", "rules:too_short",
                                 "rules:repetitive", "rules:special_chars", "rules:too_long"}
    quarantine = [json.loads(x) for x in (data / "quarantine.jsonl").read_text().splitlines()]
    assert {q["id"] for q in quarantine} == planted.malformed and all(q["reason"] for q in quarantine)
    assert not ids(data / "eval.parquet") & ids(data / "train.parquet")
    dropped = pq.read_table(data / "dropped.parquet").to_pandas()
    assert dropped["drop"].notna().all() and {"ifd", "ppl", "chars", "judge"} <= set(dropped.columns)
    judged = pq.read_table(data / "train.parquet", columns=["judge"])["judge"].to_numpy()
    assert ((judged >= 1) & (judged <= 5)).all()
    assert abs(m["tokens_after"] / m["tokens_before"] - 0.5) <= 0.05  # the ratio holds over the rows
    assert [o["name"] for o in m["operators"]] == [
        "read", "rules", "llm_judge", "lm_stats", "ifd_filter", "top_k", "compress"]
    assert all(o["seconds"] is not None for o in m["operators"][1:])

    again, _ = run_data(job_dir, resume=True, **common, **{"data.filter": {"keep_ratio": 0.3, "operators": chain},
                                                           "data.compress": {"ratio": 0.5}})
    assert again.status == "skipped"

    outcome, data = run_data(job_dir, resume=True, **common, **{"data.filter": {"method": "none"},
                                                                "data.compress": {"enabled": False}})
    m = manifest(data)
    assert outcome.status == "ran" and conserves(m)
    assert m["kept"] == m["readable"] and m["tokens_before"] == m["tokens_after"] > 0
    assert set(m["dropped"]) == {"held_out_eval"}


def test_model_operators_finish_on_a_one_cpu_cluster(job_dir, tiny_model):
    """Two model actor pools (judge, LM scorer) on one CPU: the actors ask for no CPU, so the read and
    map tasks that feed them still run (with a CPU floor per actor the stream waited forever)."""
    assert actor_cpus(1, 2) == 0.0 and actor_cpus(2, 2) == 0.5 and actor_cpus(16, 4) == 1.0
    # three candidates sharing the rows on one GPU: a third each, so every pool starts
    assert actor_gpus(1, 1, 3) == pytest.approx(1 / 3) and actor_gpus(1, 8, 3) == 1 and actor_gpus(0, 1, 3) == 0
    write_corpus(job_dir / "data" / "corpus.jsonl", 40, seed=5)
    chain = [{"name": "llm_judge", "params": {"model": "zoo/llama-s"}}, {"name": "ifd_filter"},
             {"name": "top_k", "params": {"score": "judge"}}]
    outcome, data = run_data(job_dir, cpus=1, **{
        "data.train.path": "data/corpus.jsonl", "data.reference_model": str(tiny_model("llama")),
        "data.filter": {"keep_ratio": 0.5, "operators": chain}, "data.compress": {"enabled": False}})
    m = manifest(data)
    assert outcome.status == "ran" and conserves(m) and m["kept"] > 0


def test_minhash_drops_the_planted_copy_and_keeps_the_original(job_dir, tiny_model):
    planted = write_corpus(job_dir / "data" / "dups.jsonl", 200, malformed=0.0, dups=0.1, seed=5)
    _, data = run_data(job_dir, **{
        "data.train.path": "data/dups.jsonl", "data.eval": {"split_ratio": 0.05},
        "data.reference_model": str(tiny_model("llama")), "data.compress": {"enabled": False},
        "data.filter": {"operators": [{"name": "minhash_dedup", "params": {"threshold": 0.8}}]}})
    m = manifest(data)
    dropped = pq.read_table(data / "dropped.parquet").to_pandas().set_index("id")["drop"].to_dict()
    kept, held_out = ids(data / "train.parquet"), ids(data / "eval.parquet")
    assert planted.pairs and conserves(m)
    for orig, copy in planted.pairs:
        if copy in held_out or orig in held_out:
            continue  # eval rows are never filtered
        assert copy not in kept and dropped[copy].startswith("near_duplicate_of:")
        assert dropped[copy].split(":", 1)[1] not in dropped  # the root of its group was kept


@pytest.mark.slow
def test_20k_rows_with_malformed_lines_and_planted_duplicates(job_dir, tiny_model):
    planted = write_corpus(job_dir / "data" / "big.jsonl", 20_000, malformed=0.02, dups=0.05, seed=0)
    outcome, data = run_data(job_dir, **{
        "data.train.path": "data/big.jsonl", "data.eval": {"path": "data/train.jsonl"},
        "data.reference_model": str(tiny_model("llama")), "data.batch_size": 256, "data.num_actors": 2,
        "data.filter": {"method": "hybrid", "keep_ratio": 0.2}, "data.compress": {"ratio": 0.6}})
    m = manifest(data)
    assert conserves(m) and m["input"] == 20_000
    quarantine = {json.loads(x)["id"]: json.loads(x)["reason"]
                  for x in (data / "quarantine.jsonl").read_text().splitlines()}
    train_q = {k for k in quarantine if k.startswith("big.jsonl")}
    assert train_q == planted.malformed and all(quarantine.values())
    kept = ids(data / "train.parquet")
    assert not [p for p in planted.pairs if p[0] in kept and p[1] in kept]
    # Two scoring actors, yet the rows come out in the order they were read: a seeded run samples,
    # evaluates and batches the same rows every time, whatever the timing.
    lines = [int(i.rsplit(":", 1)[1]) for i in pq.read_table(data / "train.parquet", columns=["id"])["id"].to_pylist()]
    assert lines == sorted(lines)
    assert abs(m["kept"] - 0.2 * m["readable"]) <= 0.01 * 0.2 * m["readable"]
    assert abs(m["tokens_after"] / m["tokens_before"] - 0.6) <= 0.05
    assert read_marker(data.parent, damoc.data.stage.DataStage)["counts"]["kept"] == m["kept"]


def test_drop_table_looks_up_reasons_by_row_order():
    import numpy as np
    import pandas as pd

    from damoc.data.stream import DropTable

    table = DropTable({7: "x", 22: "near_duplicate_of:a:1", 10: "x", 3 << 40: "y"})
    assert table.lookup(np.array([7, 8, 22, 10, 100, 0, 3 << 40])) == [
        "x", None, "near_duplicate_of:a:1", "x", None, None, "y"]
    df = pd.DataFrame({"order": [7, 8, 9], "drop": ["rules:too_long", None, None]}, index=[5, 6, 7])
    assert table.apply(df)["drop"].tolist() == ["rules:too_long", None, None]  # an earlier reason stays
    assert DropTable({}).lookup(np.array([1])) == [None]


def test_shared_reference_lms_score_equal_shares_and_cannot_favour_a_candidate(job_dir, tiny_model):
    """Two candidates of different widths score the rows between them (no reference_model): each row by
    one, drawn from its content; the budget is split by share and each share is selected on its own
    scorer's stats and embeddings. Listing the candidates the other way round changes nothing."""
    import numpy as np

    write_corpus(job_dir / "data" / "corpus.jsonl", 160, malformed=0.0, dups=0.0, seed=7)
    (job_dir / "zoo" / "qwen-w").symlink_to(tiny_model("qwen2", hidden=48))
    cands = [{"name": "llama-s", "path": "zoo/llama-s"}, {"name": "qwen-w", "path": "zoo/qwen-w"}]
    common = {"data.train.path": "data/corpus.jsonl", "data.eval": {"split_ratio": 0.1}, "data.batch_size": 32,
              "data.filter": {"method": "hybrid", "keep_ratio": 0.4}, "data.compress": {"ratio": 0.6}}
    _, data = run_data(job_dir, **common, candidates=cands)
    _, swapped = run_data(job_dir, **common, candidates=cands[::-1], output_dir="runs/swapped")
    m = manifest(data)
    assert conserves(m) and m["reference_model"] is None and m["reference_lm"]["rule"] == "shared"
    rows = {n: v["rows"] for n, v in m["reference_lm"]["models"].items()}
    assert set(rows) == {"llama-s", "qwen-w"} and min(rows.values()) > 0.3 * sum(rows.values())
    assert sum(rows.values()) == m["readable"]  # each alive row scored once
    train = pq.read_table(data / "train.parquet").to_pandas()
    dropped = pq.read_table(data / "dropped.parquet").to_pandas()
    at_deita = np.bincount(train["scorer"], minlength=2) + np.bincount(
        dropped.loc[dropped["drop"].str.startswith("deita"), "scorer"].astype(int), minlength=2)
    assert m["kept"] == m["budget"] == round(0.4 * m["readable"])
    assert abs(m["tokens_after"] / m["tokens_before"] - 0.6) <= 0.05  # each scorer's rows at the ratio
    assert np.bincount(train["scorer"], minlength=2).tolist() == split_budget(m["budget"], at_deita.tolist())
    again = pq.read_table(swapped / "train.parquet").to_pandas()
    assert train[["id", "instruction", "input", "output"]].equals(again[["id", "instruction", "input", "output"]])
    assert manifest(swapped)["reference_lm"]["models"]["qwen-w"]["rows"] == rows["qwen-w"]


def test_the_eval_split_follows_the_rows_not_the_file(job_dir):
    """The same rows as JSONL and as CSV hold out the same eval rows (the draw hashes the fields)."""
    import csv

    rows = [{"q": f"What is item {i}?", "a": f"Item {i} is thing {i * 7 % 13}."} for i in range(200)]
    (job_dir / "data" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(job_dir / "data" / "rows.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["q", "a"])
        w.writeheader()
        w.writerows(rows)
    held = []
    for name in ("rows.jsonl", "rows.csv"):
        _, data = run_data(job_dir, **{"data.train.path": f"data/{name}", "data.eval": {"split_ratio": 0.15},
                                       "data.fields": {"instruction": "q", "output": "a"},
                                       "data.filter": {"method": "none"}, "data.compress": {"enabled": False},
                                       "output_dir": f"runs/{name}"})
        held.append(set(pq.read_table(data / "eval.parquet", columns=["instruction"])["instruction"].to_pylist()))
    assert held[0] == held[1] and 10 < len(held[0]) < 60


def test_shared_compression_without_a_filter_runs_in_pass_2_per_share(job_dir, tiny_model):
    """No filter, compression on: the candidates compress their shares of the kept rows in pass 2, one pool
    each in one stream (the rows one pool skips must still reach the next as text)."""
    (job_dir / "zoo" / "gpt2-s").symlink_to(tiny_model("gpt2"))
    write_corpus(job_dir / "data" / "corpus.jsonl", 60, malformed=0.0, dups=0.0, seed=2)
    _, data = run_data(job_dir, **{"data.train.path": "data/corpus.jsonl", "data.eval": {"split_ratio": 0.2},
                                   "data.filter": {"method": "none"}, "data.compress": {"ratio": 0.6}},
                       candidates=[{"name": "llama-s", "path": "zoo/llama-s"}, {"name": "gpt2-s", "path": "zoo/gpt2-s"}])
    m = manifest(data)
    rows = {n: v["rows"] for n, v in m["reference_lm"]["models"].items()}
    assert conserves(m) and sum(rows.values()) == m["kept"] and min(rows.values()) > 0
    assert abs(m["tokens_after"] / m["tokens_before"] - 0.6) <= 0.05
    train = pq.read_table(data / "train.parquet")
    assert str(train.schema.field("instruction").type) == "string" and len(train) == m["kept"]


def test_damoc_plan_budgets_the_rows_the_data_stage_keeps(job_dir, tiny_model):
    """`damoc plan` and the data stage share one rule (damoc/schedule.py::row_budget) over the same base:
    the readable rows, counted by the plan as the stage reads them (malformed lines quarantined, the eval
    split drawn by the same hash). Before, the plan took the split's share of every line (a different
    base, so a different budget) on this corpus. With no budgeted selector, neither cuts."""
    from damoc.plan import project

    write_corpus(job_dir / "data" / "corpus.jsonl", 300, malformed=0.05, dups=0.05, seed=4)
    common = {"data.train.path": "data/corpus.jsonl", "data.eval": {"split_ratio": 0.15},
              "data.reference_model": str(tiny_model("llama")), "data.batch_size": 64}
    for filt in ({"method": "hybrid", "keep_ratio": 0.3}, {"keep_ratio": 0.3, "operators": [{"name": "rules"}]}):
        _, data = run_data(job_dir, **common, **{"data.filter": filt})
        m = manifest(data)
        plan = project(spec_from_data(spec_dict(**common, **{"data.filter": filt}), base_dir=str(job_dir)), str(job_dir))
        assert plan["train_rows"] == m["readable"] and int(300 * 0.85) != m["readable"]
        assert plan["kept_rows"] == (m["budget"] if m["budget"] is not None else m["readable"])
        assert (m["budget"] is None) == ("operators" in filt)
