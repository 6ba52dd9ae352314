"""`damoc plan`: the projection before anything is spent, offline."""

from __future__ import annotations

import pytest
from conftest import QA_ROWS, spec_dict, write_jsonl

from damoc.cli import main
from damoc.plan import asha_schedule, project
from damoc.spec import spec_from_data


def test_asha_schedule_is_successive_halving_stopped_once_decided():
    assert asha_schedule(5, [8, 16, 32, 64], 100, 2, decide=True) == [32, 32, 16, 8, 8]
    assert asha_schedule(5, [8, 16, 32, 64], 100, 2, decide=False) == [100, 32, 16, 8, 8]
    assert asha_schedule(3, [], 40, 2, decide=True) == [40, 40, 40]


def test_projection_reads_configs_and_samples_the_data(tmp_path, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    write_jsonl(tmp_path / "data" / "train.jsonl", QA_ROWS * 10)
    model = tiny_model("llama", hidden=32, layers=4)
    spec = spec_from_data(spec_dict(**{
        "candidates": [{"name": "small", "path": str(model)}, {"name": "hub", "hf": "no-such/model", "params": 7e9}],
        "finetune": {"epochs": 2, "batch_size": 4, "num_workers": 1, "max_steps": 10_000},
        "data.filter": {"keep_ratio": 0.25}, "data.eval": {"split_ratio": 0.1}}), base_dir=str(tmp_path))
    p = project(spec, str(tmp_path))
    by = {c["name"]: c for c in p["candidates"]}
    real = sum(t.numel() for t in AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).parameters())
    assert by["small"]["params"] == real and by["small"]["source"] == "config" and by["small"]["layers"] == 4
    assert by["hub"]["params"] == 7e9 and by["hub"]["source"] == "spec"
    assert p["train_rows"] == 270 and p["kept_rows"] == round(0.25 * 270)
    assert by["small"]["full_steps"] == 135  # 2 epochs x 270 rows / 4 rows per step
    assert p["data"]["source"] == "sampled" and p["ratio_flops"] > 4  # a quarter of the rows, pruned, ASHA
    assert any("config not readable" in a for a in p["assumptions"])


def test_plan_of_a_cluster_job_runs_offline(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["plan", "jobs/medical_qa.yaml"]) == 0
    out = capsys.readouterr().out
    assert "fine-tuning every candidate in full" in out and "GPU-hours" in out
    assert "qwen2.5-7b" in out and "spec" in out and "saving:" in out
