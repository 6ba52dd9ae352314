"""`damoc plan`: the projection before anything is spent, offline."""

from __future__ import annotations

import pytest
from conftest import QA_ROWS, spec_dict, write_jsonl

from damoc.cli import main
from damoc.plan import project
from damoc.schedule import asha_rungs, asha_schedule, grace_for_saving
from damoc.spec import spec_from_data


def test_asha_schedule_is_successive_halving_stopped_once_decided():
    assert asha_schedule(5, [8, 16, 32, 64], 100, 2, decide=True) == [32, 32, 16, 8, 8]
    assert asha_schedule(5, [8, 16, 32, 64], 100, 2, decide=False) == [100, 32, 16, 8, 8]
    assert asha_schedule(3, [], 40, 2, decide=True) == [40, 40, 40]


def test_auto_grace_is_the_longest_that_keeps_the_saving():
    """5 trials, rf 2, stopped once decided: the schedule trains 12 x grace trial-steps (5 to the first rung,
    3 to the second, 2 to the third), so at 1 per step and 1200 for full fine-tuning the saving is 100 / g."""
    def spent(g):
        return sum(asha_schedule(5, asha_rungs(g, 2, 51), 51, 2, True))

    assert spent(3) == 36 and spent(5) == 60
    assert grace_for_saving(5, 51, 1200, 1.0, 50, 1, 2, True) == (2, 50.0)
    assert grace_for_saving(5, 51, 1200, 1.0, 20, 1, 2, True) == (5, 20.0)
    assert grace_for_saving(5, 51, 1200, 1.0, 19, 1, 2, True)[0] == 5  # 6 would be 16.7x
    # out of reach: the floor, with the saving it does give
    assert grace_for_saving(5, 51, 1200, 1.0, 500, 2, 2, True) == (2, 50.0)
    # enough to train everyone to the end: the grace period reaches the plan (no early stopping)
    assert grace_for_saving(5, 51, 1e9, 1.0, 50, 2, 2, True)[0] == 51


def test_auto_grace_in_the_finetune_stage_counts_rows_and_parameters(tmp_path):
    """The stage reads what full fine-tuning would train from the run directory: every readable row
    (data/manifest.json), each candidate unpruned (models/NAME/compression.json)."""
    from types import SimpleNamespace

    import pyarrow as pa
    import pyarrow.parquet as pq

    from damoc.report.build import grace_note
    from damoc.rundir import atomic_write_json
    from damoc.train.stage import grace_period

    (tmp_path / "data").mkdir()
    atomic_write_json(tmp_path / "data" / "manifest.json", {"readable": 1000, "kept": 200})
    pq.write_table(pa.table({"instruction": ["q"] * 200}), tmp_path / "data" / "train.parquet")
    usable = {}
    for name in ("a", "b", "c", "d", "e"):
        (tmp_path / "models" / name).mkdir(parents=True)
        atomic_write_json(tmp_path / "models" / name / "compression.json", {"params_before": 300, "params_after": 200})
        usable[name] = {"name": name, "path": str(tmp_path / "models" / name)}
    spec = spec_from_data(spec_dict(**{
        "candidates": [{"name": n, "path": usable[n]["path"]} for n in usable],
        "finetune": {"epochs": 2, "batch_size": 8, "num_workers": 1, "grad_accum": 1, "max_steps": 10_000},
        "tune": {"grace_period": "auto", "target_saving": 50}}), check_files=False)
    ctx = SimpleNamespace(spec=spec, input=lambda stage: tmp_path / stage)
    grace, info = grace_period(ctx, usable, steps=50)
    # full: 5 x 300 params x 250 steps; DaMoC: 200 params x 12 g trial-steps -> 156 / g
    assert grace == 3 and info["full_steps"] == 250 and info["full_rows"] == 1000
    assert info["projected_saving"] == pytest.approx(5 * 300 * 250 / (200 * 36), rel=1e-3)
    assert "auto: 3 steps" in grace_note(info) and "out of reach" not in grace_note(info)  # the report's line
    spec.tune.target_saving = 500  # out of reach: the floor, said so
    grace, info = grace_period(ctx, usable, steps=50)
    assert grace == 2 and "out of reach above the floor of 2 steps" in grace_note(info)
    spec.tune.grace_period = 7
    assert grace_period(ctx, usable, steps=50) == (7, None)


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
    assert by["small"]["memory_gib"] > 0.5 and by["hub"]["memory_gib"] is None  # no config, no estimate


def test_trial_memory_adds_its_terms_from_the_shape(tiny_model):
    """The estimate's arithmetic, term by term, on a real model's shape (LoRA on the 7 projections)."""
    import torch
    from transformers import AutoModelForCausalLM

    from damoc.lm.memory import GIB, PROCESS_BYTES, meta_shape, shape_of, trial_memory

    path = tiny_model("llama", hidden=32, layers=4)
    shape = meta_shape(str(path), "auto")
    real = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert shape == shape_of(real, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(real, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"]))
    assert shape.trainable("lora", 4) == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    est = trial_memory(shape, method="lora", lora_r=4, micro_batch=2, length=10, gpu=False, chunk_floats=1 << 30)
    h, i, v, layers = shape.hidden, shape.intermediate, shape.vocab, shape.layers
    assert (h, i, layers, shape.heads) == (32, 64, 4, 4)
    assert est.weights == 4 * shape.params and est.trainable_state == 16 * shape.trainable("lora", 4)
    assert est.activations == 20 * layers * (24 * h + 6 * i + 4 * 10) * 4
    assert est.logits == 12 * 10 * v  # half of 20 positions scored, three fp32 copies
    assert est.host == PROCESS_BYTES + est.weights + est.trainable_state + est.activations + est.logits
    gpu = trial_memory(shape, method="full", lora_r=4, micro_batch=2, length=10, gpu=True, weight_bytes=2)
    assert gpu.host == PROCESS_BYTES + 2 * shape.params and gpu.trainable_state == 16 * shape.params
    # a 262k vocabulary: one chunk of logits alive, not the micro-batch's
    big = trial_memory(shape.__class__(**{**shape.__dict__, "vocab": 262_144}), method="lora", lora_r=4,
                       micro_batch=8, length=512, gpu=False)
    assert big.logits == 12 * 256 * 262_144 < GIB


def test_plan_of_a_cluster_job_runs_offline(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["plan", "jobs/medical_qa.yaml"]) == 0
    out = capsys.readouterr().out
    assert "fine-tuning every candidate in full" in out and "GPU-hours" in out
    assert "qwen2.5-7b" in out and "spec" in out and "against fine-tuning every candidate in full:" in out and "memory/worker" in out


def test_the_plans_row_budget_is_the_data_stages(tmp_path, tiny_model):
    """keep_ratio cuts rows only where a budgeted selector is in the chain, as the data stage applies it: a
    chain of rules alone keeps every row (the plan used to project the cut whenever filter.method != none)."""
    write_jsonl(tmp_path / "data" / "train.jsonl", QA_ROWS * 10)
    model = tiny_model("llama", hidden=32, layers=4)
    base = {"candidates": [{"name": "small", "path": str(model)}], "data.eval": {"split_ratio": 0.1},
            "data.filter": {"keep_ratio": 0.25, "operators": [{"name": "rules"}]}}
    p = project(spec_from_data(spec_dict(**base), base_dir=str(tmp_path)), str(tmp_path))
    assert p["train_rows"] == 270 and p["kept_rows"] == 270
    base["data.filter"] = {"keep_ratio": 0.25, "operators": [{"name": "rules"}, {"name": "top_k", "params": {"score": "chars"}}]}
    p = project(spec_from_data(spec_dict(**base), base_dir=str(tmp_path)), str(tmp_path))
    assert p["kept_rows"] == round(0.25 * 270)


def test_the_plans_damoc_cost_adds_its_stages_from_their_passes(tmp_path, tiny_model):
    """DaMoC's projected worker-seconds are the data stage's (start-up, rows, the reference LM's two passes
    over every row), the model stage's (load, the zero-shot pass, the scoring pass, each damage probe the
    search makes, the pruned loss) and the finetune stage's (start-up, training, each evaluation)."""
    from damoc import plan as P
    from damoc.model.compress import largest_within

    write_jsonl(tmp_path / "data" / "train.jsonl", QA_ROWS * 10)
    write_jsonl(tmp_path / "data" / "eval.jsonl", QA_ROWS)
    model = tiny_model("llama", hidden=32, layers=8)
    spec = spec_from_data(spec_dict(**{"candidates": [{"name": "small", "path": str(model)}],
                                       "data.eval": {"path": str(tmp_path / "data" / "eval.jsonl")},
                                       "finetune": {"epochs": 1, "batch_size": 4, "max_steps": 10_000,
                                                    "num_workers": 1}}),
                          base_dir=str(tmp_path))
    p = project(spec, str(tmp_path))
    c, d, stages = p["candidates"][0], p["data"], p["damoc"]["stages"]
    params, rows, kept, evals = c["params"], p["train_rows"], p["kept_rows"], p["eval_rows"]
    assert (rows, kept, evals) == (300, 60, len(QA_ROWS))
    lm = 2 * params * rows * d["tokens_per_row"] * (2 - d["prompt_share"]) / P.rate(params, False, False)
    assert stages["data"] == pytest.approx(P.DATA_FIXED_S + P.DATA_ROW_S * rows + lm, abs=0.1)
    # auto pruning assumed to stop at 2 of 8 layers (4 removable): the search probes 1, 2, 4 (over), 3 (over)
    assert list(largest_within(lambda n: float(n > 2), 4, 0.0)[1]) == [0, 1, 2, 4, 3]
    assert P.expected_probes(spec.model, 8, 0.25) == 4
    kept_tokens = d["tokens_per_row"] * (1 - d["prompt_share"] * (1 - 0.6))
    passes = 1 + 4 + 1  # scores and losses, four probes, the pruned loss
    flops = 2 * params * (passes * kept * kept_tokens + evals * d["tokens_per_row"])
    assert stages["models"] == pytest.approx(P.MODEL_FIXED_S + 4 * params / P.LOAD_BYTES_PER_S
                                             + flops / P.rate(params, False, False), abs=0.1)
    after = c["params_after"]
    train = c["damoc_flops"] / P.rate(after, True, False)
    evaluate = c["evaluations"] * 2 * after * evals * d["tokens_per_row"] / P.rate(after, False, False)
    assert c["evaluations"] >= 2 and stages["finetune"] == pytest.approx(P.TRIAL_FIXED_S["local"] + train + evaluate, abs=0.1)
    assert p["damoc"]["seconds"] == pytest.approx(sum(stages.values()), abs=0.2)  # the stages are rounded


def test_the_plans_data_stage_prices_the_reference_lm_rule(tmp_path, tiny_model):
    """Shared rows cost the candidates' mean forward pass per row; the smallest candidate's, its own."""
    from damoc import plan as P

    write_jsonl(tmp_path / "data" / "train.jsonl", QA_ROWS * 10)
    small, large = tiny_model("llama", hidden=32, layers=4), tiny_model("llama", hidden=64, layers=8)
    cands = [{"name": "small", "path": str(small)}, {"name": "large", "path": str(large)}]
    stages = {}
    for rule in ("shared", "smallest"):
        spec = spec_from_data(spec_dict(candidates=cands, **{"data.reference_lm": rule}), base_dir=str(tmp_path))
        p = project(spec, str(tmp_path))
        stages[rule] = p["damoc"]["stages"]["data"] - P.DATA_FIXED_S - P.DATA_ROW_S * p["train_rows"]
        params = {c["name"]: c["params"] for c in p["candidates"]}
    d, rows = p["data"], p["train_rows"]
    per = {n: 2 * v * rows * d["tokens_per_row"] * (2 - d["prompt_share"]) / P.rate(v, False, False)
           for n, v in params.items()}
    assert stages["smallest"] == pytest.approx(per["small"], abs=0.1)
    assert stages["shared"] == pytest.approx((per["small"] + per["large"]) / 2, abs=0.1)


def test_a_ratio_below_one_is_worded_as_a_cost():
    from damoc.report.savings import cost_words

    assert cost_words(21.04) == "21.0x less" and cost_words(1 / 1.7) == "1.7x MORE" and cost_words(None) == "-"
