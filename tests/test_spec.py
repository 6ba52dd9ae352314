"""JobSpec: strict keys, ranges, files, YAML syntax; one line per problem, each with its key path."""

from __future__ import annotations

import pytest
from conftest import spec_dict, write_spec

from damoc.spec import JobSpec, SpecError, load_spec, spec_from_data


def problems(data, base_dir) -> list[str]:
    with pytest.raises(SpecError) as exc:
        spec_from_data(data, base_dir=str(base_dir))
    return exc.value.problems


def test_valid_spec_gets_demo_defaults(job_dir):
    spec = spec_from_data(spec_dict(output_dir=None), base_dir=str(job_dir))
    assert spec.output_dir == "runs/t"
    assert spec.data.filter.method == "hybrid" and spec.data.filter.keep_ratio == 0.2
    assert spec.data.eval.split_ratio == 0.1
    assert spec.model.merge.method == "none" and spec.model.merge.scale == 0.1  # bench/layer_merge.py
    assert spec.finetune.deepspeed.zero_stage == 2
    assert spec.finetune.use_gpu is False and spec.tune.scheduler == "asha"
    assert spec.select.mode == "min"
    assert spec.candidates[0].trust_remote_code is False


def test_design_md_example_is_valid(job_dir):
    data = spec_dict(**{
        "seed": 0,
        "data.fields": {"instruction": "question", "input": "context", "output": "answer"},
        "data.filter": {"method": "hybrid", "keep_ratio": 0.2},
        "data.compress": {"enabled": True, "ratio": 0.6},
        "data.rewrite": {"enabled": False, "model": None, "endpoint": None, "rounds": 2},
        "model": {"enabled": True, "score": "block_influence", "prune_ratio": 0.5,
                  "merge": {"method": "ties", "density": 0.2}},
        "finetune": {"method": "lora", "deepspeed": {"enabled": True, "zero_stage": 2},
                     "num_workers": 2, "use_gpu": False, "max_steps": 200},
        "tune": {"scheduler": "asha"},
        "select": {"metric": "eval_loss"},
    })
    assert isinstance(spec_from_data(data, base_dir=str(job_dir)), JobSpec)


def test_unknown_key_is_named(job_dir):
    assert problems(spec_dict(**{"finetune.lora.rank": 8}), job_dir) == ["finetune.lora.rank: unknown key"]


def test_wrong_type(job_dir):
    assert problems(spec_dict(**{"finetune.max_steps": "many"}), job_dir) == [
        "finetune.max_steps: must be an integer"]


def test_out_of_range_uses_contract_wording(job_dir):
    assert problems(spec_dict(**{"finetune.lora.r": 0}), job_dir) == ["finetune.lora.r: must be > 0"]
    assert problems(spec_dict(**{"data.filter.keep_ratio": 1.5}), job_dir) == [
        "data.filter.keep_ratio: must be <= 1.0"]


def test_bad_choice_lists_the_allowed_values(job_dir):
    [line] = problems(spec_dict(**{"model.merge.method": "slerp"}), job_dir)
    assert line.startswith("model.merge.method: must be one of:") and "ties" in line and "dare" in line


def test_missing_files_are_named(job_dir):
    lines = problems(spec_dict(**{"data.train.path": "data/nope.jsonl",
                                  "candidates": [{"name": "x", "path": "zoo/none"}]}), job_dir)
    assert lines == [
        f"data.train.path: no such file: {job_dir}/data/nope.jsonl",
        f"candidates[0].path: no such file: {job_dir}/zoo/none",
    ]


def test_candidate_folder_needs_config(job_dir):
    (job_dir / "zoo" / "empty").mkdir()
    [line] = problems(spec_dict(candidates=[{"name": "e", "path": "zoo/empty"}]), job_dir)
    assert line == f"candidates[0].path: no config.json in {job_dir}/zoo/empty"


def test_hub_names_and_uris_are_not_checked_offline(job_dir):
    spec = spec_from_data(spec_dict(**{
        "data.train": {"hf": "org/medical-qa", "split": "train"},
        "candidates": [{"name": "q", "hf": "Qwen/Qwen2.5-7B"}],
        "output_dir": "s3://bucket/runs/t",
    }), base_dir=str(job_dir))
    assert spec.candidates[0].hf == "Qwen/Qwen2.5-7B"


def test_exactly_one_source(job_dir):
    assert problems(spec_dict(**{"data.train": {"path": "data/train.jsonl", "hf": "x/y"}}), job_dir) == [
        "data.train: give exactly one of 'path' or 'hf'"]
    assert problems(spec_dict(**{"data.eval": {"split_ratio": 0.1, "hf": "x/y"}}), job_dir) == [
        "data.eval: give exactly one of 'path', 'hf' or 'split_ratio'"]


def test_cross_field_checks(job_dir):
    assert problems(spec_dict(candidates=[{"name": "a", "path": "zoo/llama-s"},
                                          {"name": "a", "path": "zoo/llama-s"}]), job_dir) == [
        "candidates: duplicate candidate name 'a'"]
    assert problems(spec_dict(**{"finetune.precision": "fp16"}), job_dir) == [
        "finetune: precision fp16 needs use_gpu: true (use bf16 on CPU)"]
    assert problems(spec_dict(**{"tune.grace_period": 500, "finetune.max_steps": 100}), job_dir) == [
        "(top level): tune.grace_period (500) exceeds finetune.max_steps (100)"]
    # an unset max_steps is the field's default (200), not another figure
    assert spec_from_data(spec_dict(**{"tune.grace_period": 150}), base_dir=str(job_dir)).tune.grace_period == 150
    assert problems(spec_dict(**{"tune.grace_period": 500}), job_dir) == [
        "(top level): tune.grace_period (500) exceeds finetune.max_steps (200)"]
    assert problems(spec_dict(**{"data.rewrite.enabled": True}), job_dir) == [
        "data.rewrite: rewrite.enabled needs 'model' or 'endpoint'"]


def test_grace_period_is_steps_or_auto(job_dir):
    assert spec_from_data(spec_dict(), base_dir=str(job_dir)).tune.grace_period == "auto"  # the default
    spec = spec_from_data(spec_dict(**{"tune.grace_period": "auto", "tune.target_saving": 30}), base_dir=str(job_dir))
    assert spec.tune.grace_period == "auto" and spec.tune.target_saving == 30 and spec.tune.min_grace_period == 2
    for bad in (0, "soon"):
        (line,) = problems(spec_dict(**{"tune.grace_period": bad}), job_dir)
        assert line.startswith("tune.grace_period: "), line
    assert problems(spec_dict(**{"tune.target_saving": 1}), job_dir) == ["tune.target_saving: must be > 1.0"]


def test_prune_ratio_is_a_fraction_or_auto(job_dir):
    m = spec_from_data(spec_dict(), base_dir=str(job_dir)).model
    assert (m.prune_ratio, m.max_damage, m.max_prune_ratio, m.score) == ("auto", 0.1, 0.5, "block_influence")
    m = spec_from_data(spec_dict(**{"model.prune_ratio": 0.25, "model.score": "last_layers"}), base_dir=str(job_dir)).model
    assert m.prune_ratio == 0.25 and m.score == "last_layers"
    for bad in (1.0, -0.1, "half", True):
        (line,) = problems(spec_dict(**{"model.prune_ratio": bad}), job_dir)
        assert line.startswith("model.prune_ratio: "), line
    assert problems(spec_dict(**{"model.max_damage": 0}), job_dir) == ["model.max_damage: must be > 0.0"]


def test_three_independent_errors_three_lines(job_dir):
    lines = problems(spec_dict(**{"finetune.lora.r": -1, "tune.colour": "red",
                                  "data.train.path": "missing.jsonl"}), job_dir)
    assert len(lines) == 3
    assert {line.split(":")[0] for line in lines} == {"finetune.lora.r", "tune.colour", "data.train.path"}


def test_yaml_syntax_error_has_line(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: x\ndata:\n  train: {path: a\ncandidates: []\n")
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    [line] = exc.value.problems
    assert line.startswith("(yaml) line ") and "column" in line


def test_duplicate_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: a\nseed: 1\nname: b\n")
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    assert exc.value.problems == ["(yaml) line 3, column 1: duplicate key 'name' (first on line 1)"]


def test_not_a_mapping_and_unreadable(tmp_path):
    path = write_spec(tmp_path / "list.yaml", {"x": 1})
    path.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(path)
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "absent.yaml")


def test_relative_paths_resolve_against_base_dir(job_dir, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    path = write_spec(elsewhere / "job.yaml", spec_dict())
    assert load_spec(path, base_dir=str(job_dir)).name == "t"
    with pytest.raises(SpecError):
        load_spec(path, base_dir=str(elsewhere))


def test_new_user_mistakes_all_reported_in_one_pass(job_dir):
    """A bad hub id (data and candidate), accuracy on a task without options, a duplicate name and an
    unrelated bad value: every one named by its key path, in one run of validate."""
    lines = problems(spec_dict(**{
        "data.train": {"hf": "not a hub id!!"},
        "candidates": [{"name": "a", "path": "zoo/llama-s"}, {"name": "a", "hf": "org/x/y"}],
        "select.metric": "accuracy", "finetune.lora.r": 0}), job_dir)
    assert lines[0].startswith("data.train.hf: 'not a hub id!!' is not a Hugging Face hub id")
    assert any(ln.startswith("candidates[1].hf: 'org/x/y' is not a Hugging Face hub id") for ln in lines)
    assert any(ln.startswith("finetune.lora.r: ") for ln in lines)
    assert "candidates: duplicate candidate name 'a'" in lines
    assert any(ln.startswith("(top level): select.metric accuracy") and "multiple_choice" in ln for ln in lines)
    assert len(lines) == 5


def test_hub_data_set_options(job_dir):
    spec = spec_from_data(spec_dict(**{"data.train": {"hf": "org/qa", "config": "en", "revision": "v1.0",
                                                      "data_files": {"train": "train-*.parquet"}}}),
                          base_dir=str(job_dir))
    assert (spec.data.train.config, spec.data.train.revision) == ("en", "v1.0")
    assert problems(spec_dict(**{"data.train": {"path": "data/train.jsonl", "config": "en"}}), job_dir) == [
        "data.train: config only apply to a hub data set ('hf')"]
    spec_from_data(spec_dict(**{"select.metric": "accuracy", "data.task": "multiple_choice"}), base_dir=str(job_dir))


def test_a_mistyped_key_gets_the_closest_one_its_section_knows(job_dir):
    lines = problems(spec_dict(**{"data.filtr": {}, "data.filter": {"keep_ration": 0.2},
                                  "tune": {"grace": 3}, "finetun": {}, "candidates": [
                                      {"name": "a", "path": "zoo/llama-s", "trust_remote": True}],
                                  "model": {"zzz": 1}}), job_dir)
    assert set(lines) == {"data.filtr: unknown key (did you mean 'filter'?)",
                          "data.filter.keep_ration: unknown key (did you mean 'keep_ratio'?)",
                          "tune.grace: unknown key (did you mean 'grace_period'?)",
                          "finetun: unknown key (did you mean 'finetune'?)",
                          "candidates[0].trust_remote: unknown key (did you mean 'trust_remote_code'?)",
                          "model.zzz: unknown key"}


def test_the_spec_takes_its_schedulers_and_merge_methods_from_their_registries():
    """A scheduler or merge method is one registry entry: the spec's allowed values are the registry's."""
    from typing import get_args

    from damoc.model.merge import MERGE_METHODS
    from damoc.schedule import SCHEDULERS
    from damoc.spec import MergeSpec, TuneSpec

    assert get_args(TuneSpec.model_fields["scheduler"].annotation) == tuple(SCHEDULERS) == ("asha", "none")
    assert get_args(MergeSpec.model_fields["method"].annotation) == tuple(MERGE_METHODS)
    assert set(MERGE_METHODS) == {"none", "ties", "dare", "task_arithmetic", "sign_agree"}
