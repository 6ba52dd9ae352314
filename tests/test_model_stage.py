"""The model stage on the embedded cluster: candidates in parallel, one failure recorded, the rest done."""

from __future__ import annotations

import json

import pytest
from conftest import spec_dict

from damoc.pipeline import Pipeline
from damoc.runtime import connect
from damoc.spec import spec_from_data

import damoc.data.stage  # noqa: F401  (registers the stages)
import damoc.model.stage  # noqa: F401


@pytest.fixture(autouse=True)
def _no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def unsupported_model(path, tokenizer_dir):
    """A tiny BLOOM: a real HF folder of an architecture the model stage has no adapter for."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = AutoConfig.for_model("bloom", vocab_size=len(tok), hidden_size=32, n_layer=2, n_head=4)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_candidates_compress_in_parallel_and_a_failure_is_recorded(job_dir, tiny_model, tokenizer_dir):
    spec = spec_from_data(spec_dict(**{
        "data.filter": {"method": "none"}, "data.compress": {"enabled": False}, "data.eval": {"split_ratio": 0.1},
        "candidates": [{"name": "llama-s", "path": str(tiny_model("llama", layers=4))},
                       {"name": "bloom-x", "path": str(unsupported_model(job_dir / "bloom", tokenizer_dir))},
                       {"name": "neox-s", "path": str(tiny_model("gpt_neox", layers=4))}],
        "model": {"prune_ratio": 0.5, "merge": {"method": "ties", "density": 0.2},
                  "calibration": {"rows": 16, "batch_size": 4}}}), base_dir=str(job_dir))
    pipeline = Pipeline(spec, base_dir=job_dir, runtime_factory=lambda: connect(None, num_cpus=2))
    outcomes = pipeline.run(["data", "models"])
    assert [o.status for o in outcomes] == ["ran", "ran"]
    models = pipeline.run_dir / "models"
    index = {e["name"]: e for e in json.loads((models / "models.json").read_text())["candidates"]}
    assert index["bloom-x"]["status"] == "failed" and "model_type 'bloom'" in index["bloom-x"]["reason"]
    failed = json.loads((models / "bloom-x" / "compression.json").read_text())
    assert failed["status"] == "failed" and failed["reason"] == index["bloom-x"]["reason"]
    for name in ("llama-s", "neox-s"):
        assert index[name]["status"] == "compressed"
        c = json.loads((models / name / "compression.json").read_text())
        assert c["layers_after"] == 2 and c["calibration"]["rows"] == 16
        assert (models / name / "config.json").is_file() and (models / name / "model.safetensors").is_file()
    assert outcomes[1].counts == {"candidates": 3, "compressed": 2, "failed": 1}


def test_gpu_candidates_each_get_their_own_actor_at_once():
    """So an autoscaling GPU group sees the whole demand (on CPUs the pool is what the cluster holds)."""
    from damoc.model.stage import ModelStage
    from damoc.spec import ModelSpec

    assert ModelStage.actors(5, ModelSpec(num_gpus=1)) == 5
    assert ModelStage.actors(3, ModelSpec(num_gpus=0.5)) == 3


def test_more_actors_start_only_when_the_candidates_left_outlast_a_start_up():
    """With an actor started ahead, the others start once the candidates left but one, at the mean
    seconds so far, would take longer than a start-up: not for a few small candidates."""
    from damoc.model.stage import worth_starting

    assert not worth_starting(4, [0.9], start_up=3.3)  # 3 x 0.9 = 2.7 s: done before a new one is ready
    assert worth_starting(5, [0.9], start_up=3.3)  # 3.6 s
    assert worth_starting(2, [40.0, 20.0], start_up=3.3)  # big candidates: at once
    assert not worth_starting(1, [40.0], start_up=3.3)  # the last one: the busy actor takes it next
    assert not worth_starting(9, [], start_up=3.3)  # nothing measured yet
