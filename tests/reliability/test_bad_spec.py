"""Every invalid spec exits 2 naming its key path, before any Ray work; candidates that cannot
be used are named by `damoc validate`, and `damoc select` still ranks the others."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import spec_dict, write_spec

from damoc.cli import main

BAD = [  # (override, the key path the error must name)
    ({"name": ""}, "name"),
    ({"seed": "zero"}, "seed"),
    ({"data.train": {"path": "data/train.jsonl", "hf": "x/y"}}, "data.train"),
    ({"data.filter.keep_ratio": 1.5}, "data.filter.keep_ratio"),
    ({"data.filter.method": "magic"}, "data.filter.method"),
    ({"data.compress.ratio": 0}, "data.compress.ratio"),
    ({"data.eval": {"split_ratio": 1.0}}, "data.eval.split_ratio"),
    ({"candidates": []}, "candidates"),
    ({"candidates": [{"name": "a", "path": "zoo/nowhere"}]}, "candidates[0].path"),
    ({"candidates": [{"name": "a b", "path": "zoo/llama-s"}]}, "candidates[0].name"),
    ({"model.prune_ratio": 1.0}, "model.prune_ratio"),
    ({"model.merge.method": "slerp"}, "model.merge.method"),
    ({"finetune.lora.r": -1}, "finetune.lora.r"),
    ({"finetune.precision": "fp16", "finetune.use_gpu": False}, "finetune"),
    ({"finetune.num_workers": 0}, "finetune.num_workers"),
    ({"tune.reduction_factor": 1}, "tune.reduction_factor"),
    ({"select.metric": "bleu"}, "select.metric"),
    ({"surprise": 1}, "surprise"),
]


@pytest.mark.parametrize("override,key", BAD, ids=[k for _, k in BAD])
def test_invalid_spec_exits_2_naming_the_key_before_any_ray_work(job_dir, monkeypatch, capsys, override, key):
    import ray

    monkeypatch.chdir(job_dir)
    write_spec(job_dir / "job.yaml", spec_dict(**override))
    for command in ("validate", "select"):
        assert main([command, "job.yaml"]) == 2
        err = capsys.readouterr().err
        assert f"job.yaml: {key}" in err, err
    assert not ray.is_initialized() and not (job_dir / "runs").exists()


def test_unusable_candidates_are_named_by_validate(job_dir, tiny_model, tokenizer_dir, monkeypatch, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    monkeypatch.chdir(job_dir)
    bloom = job_dir / "zoo" / "bloom"
    AutoModelForCausalLM.from_config(AutoConfig.for_model("bloom", vocab_size=64, hidden_size=16, n_layer=2,
                                                          n_head=2)).save_pretrained(bloom)
    custom = job_dir / "zoo" / "custom"
    shutil.copytree(tiny_model("llama", layers=2), custom)
    cfg = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "m.M"}}))
    pickled = job_dir / "zoo" / "pickled"
    shutil.copytree(tiny_model("llama", layers=2), pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    capsys.readouterr()  # drop the model-saving progress bars
    write_spec(job_dir / "job.yaml", spec_dict(candidates=[
        {"name": "ok", "path": "zoo/llama-s"}, {"name": "bloom", "path": "zoo/bloom"},
        {"name": "custom", "path": "zoo/custom"}, {"name": "pickled", "path": "zoo/pickled"}]))
    assert main(["validate", "job.yaml"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("job.yaml: candidates[1].path: unsupported architecture: model_type 'bloom'")
    assert lines[1].startswith("job.yaml: candidates[2].trust_remote_code: custom ships its own modeling code")
    assert lines[2].startswith("job.yaml: candidates[3].path: no .safetensors weights")
