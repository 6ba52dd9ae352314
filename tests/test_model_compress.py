"""Layer scores against an independent computation; each family compresses into a loadable folder."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from damoc.lm.arch import UnsupportedArchitecture, adapter_for
from damoc.model.compress import Source, calibration_examples, compress_candidate
from damoc.model.scores import batches, calibrate, calibration_loss
from damoc.spec import ModelSpec

ROWS = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": str(a + b)} for a in range(4) for b in range(3)] + [
    {"instruction": "Write add.", "input": "def add(a, b):", "output": "    return a + b"},
    {"instruction": "Say it.", "input": "", "output": "The quick brown fox jumps over the lazy dog."}]


def full_logits_losses(model, data) -> tuple[float, float, int]:
    """Summed next-token NLL of every real token and of the answer tokens, and the real-token count, from
    the model's full logits (what the calibration pass computes a chunk of positions at a time)."""
    every, answer, tokens = 0.0, 0.0, 0
    with torch.no_grad():
        for b in data:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), b["input_ids"][:, 1:], reduction="none")
            real = b["attention_mask"][:, 1:].bool()
            every += float(nll[real].sum())
            answer += float(nll[b["labels"][:, 1:] != -100].sum())
            tokens += int(real.sum())
    return every, answer, tokens


def reference_scores(model, data):
    """BI and angular distances from output_hidden_states, with the final norm switched off so the
    last entry is the last layer's own output (not what the hooks saw, computed another way)."""
    model.model.norm = torch.nn.Identity()
    bi_num, bi_den, states = None, 0, []
    with torch.no_grad():
        for b in data:
            ids, mask = b["input_ids"], b["attention_mask"]
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
    data = batches(calibration_examples(tok, ROWS, "qa", "plain", 64), 4, tok.pad_token_id)
    assert any((b["attention_mask"] == 0).any() for b in data)  # padding is present, so masking is exercised
    cal = calibrate(model, adapter_for(model.config), data)
    every, answer, tokens = full_logits_losses(model, data)
    assert cal.loss == pytest.approx(every / tokens, rel=1e-5) and cal.tokens == tokens
    assert cal.answer_nll == pytest.approx(answer, rel=1e-5)
    assert calibration_loss(model, data) == pytest.approx(cal.loss, rel=1e-6)
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


def test_auto_prune_removes_the_most_layers_within_the_damage_budget(tiny_model):
    """A binary search over the count: with a damage that grows by 0.1 a removed layer from 1.0, a 25% budget
    allows 2 layers of an 8-layer model's 6 removable (max_prune_ratio 0.75); each probe sees the model
    without the layers the order names, and the model is whole again after every probe."""
    from types import SimpleNamespace

    from damoc.model.compress import choose_layers

    path = tiny_model("llama", hidden=32, layers=8)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = adapter_for(model.config).layer_list(model)
    seen = []

    def damage(m):
        kept = adapter_for(m.config).layer_list(m)
        assert m.config.num_hidden_layers == len(kept)
        assert [mod.self_attn.layer_idx for mod in kept] == list(range(len(kept)))
        seen.append(sorted(i for i, layer in enumerate(layers) if layer not in list(kept)))
        return 1.0 + 0.1 * (8 - len(kept))

    cal = SimpleNamespace(block_influence=[0.9, 0.1, 0.5, 0.2, 0.8, 0.3, 0.7, 0.6], angular=[[0.0] * 8])
    m = ModelSpec(prune_ratio="auto", max_damage=0.25, max_prune_ratio=0.75)
    removed, record = choose_layers(model, cal, m, 8, damage)
    assert removed == [1, 3]  # the two lowest Block Influence scores
    assert record["original"] == 1.0 and record["pruned"] == pytest.approx(1.2)
    assert record["relative"] == pytest.approx(0.2) and record["max_damage"] == 0.25
    # 6 removable: 1 and 2 are within budget, 4 is over, then 3 is over
    assert list(record["probes"]) == ["0", "1", "2", "3", "4"] and len(seen) == 5
    assert seen[1:] == [[1], [1, 3], [1, 2, 3, 5], [1, 3, 5]]  # the order's first n, in the order probed
    assert adapter_for(model.config).layer_list(model) is layers and model.config.num_hidden_layers == 8
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    last, _ = choose_layers(model, cal, ModelSpec(score="last_layers", prune_ratio=0.25), 8, damage)
    assert last == [5, 6]  # the two before the final layer
    assert choose_layers(model, cal, ModelSpec(prune_ratio="auto", max_damage=0.01), 8, damage)[0] == []


def test_auto_prune_writes_the_damage_and_a_loadable_folder(tmp_path, tiny_model):
    src = tiny_model("llama", hidden=32, layers=4)
    out = tmp_path / "auto"
    r = compress_candidate(Source("a", str(src)), ROWS, ModelSpec(calibration={"rows": 16, "batch_size": 4}), out)
    d = r["damage"]
    assert r["prune_rule"] == "auto" and d["max_damage"] == 0.1 and d["metric"].startswith("calibration answer")
    assert r["prune_ratio"] == len(r["removed"]) / 4 and d["probes"]["0"] == d["original"]
    assert d["probes"][str(len(r["removed"]))] == d["pruned"] <= d["original"] * 1.1
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4 - len(r["removed"])
