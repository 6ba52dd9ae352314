"""Layer scores against an independent computation; each family compresses into a loadable folder."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from damoc.lm.arch import UnsupportedArchitecture, adapter_for
from damoc.model.compress import Source, calibration_ids, compress_candidate
from damoc.model.scores import batches, calibrate, calibration_loss
from damoc.spec import ModelSpec

ROWS = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": str(a + b)} for a in range(4) for b in range(3)] + [
    {"instruction": "Write add.", "input": "def add(a, b):", "output": "    return a + b"},
    {"instruction": "Say it.", "input": "", "output": "The quick brown fox jumps over the lazy dog."}]


def reference_scores(model, data):
    """BI and angular distances from output_hidden_states, with the final norm switched off so the
    last entry is the last layer's own output (not what the hooks saw, computed another way)."""
    model.model.norm = torch.nn.Identity()
    bi_num, bi_den, states = None, 0, []
    with torch.no_grad():
        for ids, mask in data:
            hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            m = mask.bool()
            per_layer = torch.stack([(1 - torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1))[m].sum()
                                     for a, b in zip(hs[:-1], hs[1:])])
            bi_num = per_layer if bi_num is None else bi_num + per_layer
            bi_den += int(m.sum())
            last = mask.sum(1) - 1
            states.append(torch.stack([h[torch.arange(len(ids)), last].float() for h in hs]))
    states = torch.cat(states, dim=1)  # (L+1, rows, hidden)
    ang = [[float(torch.arccos(torch.nn.functional.cosine_similarity(states[s], states[s + n], dim=-1)
                               .clamp(-1, 1)).mean() / math.pi) for s in range(len(states) - n)]
           for n in range(1, len(states))]
    return (bi_num / bi_den).tolist(), ang


def test_block_influence_and_angular_match_an_independent_computation(tiny_model):
    path = tiny_model("llama", hidden=32, layers=4, seed=1)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    data = batches(calibration_ids(tok, ROWS, "qa", "plain", 64), 4, tok.pad_token_id)
    assert any((m == 0).any() for _, m in data)  # padding is present, so masking is exercised
    cal = calibrate(model, adapter_for(model.config), data)
    assert cal.loss == pytest.approx(calibration_loss(model, data), rel=1e-6)
    bi, ang = reference_scores(model, data)
    assert cal.block_influence == pytest.approx(bi, rel=1e-4, abs=1e-6)
    for got, want in zip(cal.angular, ang):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gpt_neox", "opt"])
@pytest.mark.parametrize("merge", ["ties"])
def test_compressed_folder_loads_and_generates_the_same_with_and_without_cache(tmp_path, tiny_model, family, merge):
    src = tiny_model(family, hidden=32, layers=4)
    spec = ModelSpec(prune_ratio=0.5, merge={"method": merge, "density": 0.3}, calibration={"rows": 16, "batch_size": 4})
    out = tmp_path / family
    report = compress_candidate(Source(family, str(src)), ROWS, spec, out)
    saved = json.loads((out / "compression.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["layers_before"] == 4 and saved["layers_after"] == 2 and len(saved["removed"]) == 2
    assert 0 not in saved["removed"] and 3 not in saved["removed"]
    assert len(saved["scores"]) == 4 and saved["params_after"] < saved["params_before"]
    assert set(saved["calibration_loss"]) == {"original", "pruned", "merged"} and saved["protected"] == [0, 3]
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert adapter_for(model.config).num_layers(model.config) == 2
    assert len(adapter_for(model.config).layer_list(model)) == 2
    assert sum(p.numel() for p in model.parameters()) == saved["params_after"]
    ids = torch.tensor([[tok.bos_token_id] + tok("What is 2 plus", add_special_tokens=False)["input_ids"]])
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    cached = model.generate(ids, use_cache=True, **kw)
    uncached = model.generate(ids, use_cache=False, **kw)
    assert cached.shape[1] == ids.shape[1] + 8 and torch.equal(cached, uncached)


def test_contiguous_angular_pruning_and_no_merge(tmp_path, tiny_model):
    src = tiny_model("qwen2", hidden=32, layers=4)
    spec = ModelSpec(score="angular", prune="contiguous", prune_ratio=0.5, merge={"method": "none"},
                     calibration={"rows": 8, "batch_size": 8})
    r = compress_candidate(Source("q", str(src)), ROWS, spec, tmp_path / "q")
    assert r["removed"] == [1, 2] and r["calibration_loss"]["merged"] == r["calibration_loss"]["pruned"]
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and len(cfg.get("layer_types") or [None, None]) == 2


def test_unsupported_architecture_names_the_model_type():
    from transformers import AutoConfig

    with pytest.raises(UnsupportedArchitecture, match="model_type 'bloom'"):
        adapter_for(AutoConfig.for_model("bloom"))
