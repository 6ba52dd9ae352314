"""Memory: a trial that Ray's memory monitor kills ends as that candidate's failure, not the stage's.

The test cluster's memory monitor is set a few GiB above what the machine uses when the test starts.
One candidate is an ordinary tiny model; the other has a 2M-wide MLP, whose activations for one
micro-batch are several times that margin, so the monitor kills its trial process. It is retried once in
micro-batches half as large, killed again, and ends `failed: out of memory`, while the tiny candidate
is trained and ranked."""

from __future__ import annotations

import json

import pytest
from conftest import QA_ROWS, spec_dict, write_jsonl

from damoc.pipeline import Pipeline
from damoc.runtime import connect
from damoc.spec import spec_from_data

GIB = 1024 ** 3


def memory_hog(out, tokenizer_dir, intermediate: int = 2_000_000, hidden: int = 8):
    """A two-layer Llama with an MLP `intermediate` wide (zero weights: quick to build, 384 MB): a
    micro-batch of 8 short rows keeps ~4 GiB of MLP activations per layer for the backward pass."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from damoc.zoo.tiny import tiny_config

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = tiny_config("llama", len(tok), hidden=hidden, layers=2, heads=2,
                         special_ids={"pad": tok.pad_token_id, "bos": tok.bos_token_id, "eos": tok.eos_token_id})
    config.intermediate_size = intermediate
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.mark.slow
def test_a_trial_killed_for_memory_fails_its_candidate_and_the_others_finish(tmp_path, tiny_model, tokenizer_dir,
                                                                              monkeypatch, caplog):
    import psutil

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    hog = memory_hog(tmp_path / "hog", tokenizer_dir)
    vm = psutil.virtual_memory()
    margin = 2.5 * GIB  # the cluster and the tiny trial fit in it; the hog's activations, even halved, do not
    monkeypatch.setenv("RAY_memory_usage_threshold", f"{min(0.95, (vm.total - vm.available + margin) / vm.total):.4f}")
    monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "100")
    write_jsonl(tmp_path / "data" / "train.jsonl", QA_ROWS * 2)
    spec = spec_from_data(spec_dict(**{
        "data.filter": {"method": "none"}, "data.compress": {"enabled": False}, "data.eval": {"split_ratio": 0.2},
        "candidates": [{"name": "llama-a", "path": str(tiny_model("llama", hidden=32, layers=2))},
                       {"name": "hog", "path": str(hog)}],
        "model": {"enabled": False},
        "finetune": {"num_workers": 1, "max_steps": 2, "eval_every": 2, "batch_size": 8, "max_failures": 1},
        "tune": {"scheduler": "none", "max_concurrent_trials": 1}}), base_dir=str(tmp_path))
    pipeline = Pipeline(spec, base_dir=tmp_path, runtime_factory=lambda: connect(None, num_cpus=2))
    pipeline.run()

    results = json.loads((pipeline.run_dir / "finetune" / "results.json").read_text())
    by = {e["name"]: e for e in results["candidates"]}
    assert by["llama-a"]["status"] == "finished" and by["llama-a"]["steps"] == 2
    failed = by["hog"]
    assert failed["status"] == "failed" and failed["reason"].startswith("out of memory (needs ~"), failed
    assert failed["memory"]["memory_failures"] == 2 and failed["attempts"] == 2  # retried once, smaller
    assert "hog ran out of memory; retrying from its last checkpoint in micro-batches half as large" in caplog.text
    assert failed["memory"]["estimate_gib"] > margin / GIB  # the estimate saw it coming
    assert by["llama-a"]["memory"]["peak_gib"] < by["llama-a"]["memory"]["estimate_gib"] * 2
    ranking = json.loads((pipeline.run_dir / "report" / "ranking.json").read_text())
    ranked = {c["name"]: c for c in ranking["candidates"]}
    assert ranked["llama-a"]["rank"] == 1 and ranked["hog"]["rank"] is None
    assert "out of memory" in ranked["hog"]["reason"]
