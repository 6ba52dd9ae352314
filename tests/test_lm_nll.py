"""The answer loss computed from logits at the scored positions only equals the full-logits loss, in
value and in gradient, in one chunk or many; a family whose logits are more than the head's
projection (Gemma's soft-capping) keeps the full logits."""

from __future__ import annotations

import pytest
import torch

from damoc.lm import nll
from damoc.lm.tokens import collate, encode


def _batch(tok):
    rows = [("What is 2 plus 3?", "5, and that is the answer"), ("A longer prompt with more words in it", "ok"),
            ("Short", "a fairly long answer that spans several tokens of text")]
    return collate([encode(tok, p, a, 64) for p, a in rows], tok.pad_token_id or 0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_scored_positions_loss_equals_the_full_logits_loss(tiny_model, family, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model(family, hidden=32, layers=2)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    batch = _batch(tok)
    assert nll.output_head(model) is model.get_output_embeddings()
    full, mask = nll.token_nll(model, batch, scored_only=False)
    for floats in (nll.CHUNK_FLOATS, 3 * model.config.vocab_size):  # one chunk; chunks of 3 tokens
        monkeypatch.setattr(nll, "CHUNK_FLOATS", floats)
        part, mask2 = nll.token_nll(model, batch)
        assert torch.equal(mask, mask2)
        assert torch.allclose(full, part, atol=1e-5)
        assert float(part.detach()[~mask].abs().sum()) == 0.0

    def grads(scored_only: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        nll.causal_lm_loss(model, batch, scored_only).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want, got = grads(False), grads(True)  # chunked (3 tokens) with recomputation
    assert want.keys() == got.keys()
    for name in want:
        assert torch.allclose(want[name], got[name], atol=1e-5), name


def test_a_soft_capped_head_keeps_the_full_logits(tokenizer_dir):
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128)
    torch.manual_seed(0)
    plain = Gemma3ForCausalLM(Gemma3TextConfig(**common))
    capped = Gemma3ForCausalLM(Gemma3TextConfig(**common, final_logit_softcapping=1.0))
    assert nll.output_head(plain) is not None  # Gemma 3's default: no soft-capping, scaled embeddings only
    assert nll.output_head(capped) is None
    batch = _batch(tok)
    for model in (plain, capped):
        full, _ = nll.token_nll(model, batch, scored_only=False)
        assert torch.allclose(full, nll.token_nll(model, batch)[0], atol=1e-5)


def test_the_scoring_pass_equals_full_logits_where_it_reads_them(tiny_model, monkeypatch):
    """The data stage's pass (`score`) computes logits only at the positions it reads: every real token's
    self-information for compression and the answer's loss, or the answer's alone. Each equals what the
    full logits of that row alone give (no padding), as does the pooled embedding, in one chunk or many."""
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model("llama", hidden=32, layers=2)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    rows = [("What is 2 plus 3?", "5, and that is the answer"), ("A longer prompt with more words in it", "ok"),
            ("Short", "a fairly long answer that spans several tokens of text")]
    examples = [encode(tok, p, a, 64, spans=True) for p, a in rows]
    want = []
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e.ids])
            out = model(input_ids=ids, output_hidden_states=True)
            every = torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:], reduction="none")
            scored = torch.tensor(e.labels[1:]) != -100
            n_prompt = len(e.ids) - int(scored.sum())
            info = [math.inf if p == 0 else float(every[p - 1]) for p in range(e.prompt_start, n_prompt)]
            emb = torch.nn.functional.normalize(out.hidden_states[-1][0].mean(0), dim=-1)
            want.append((float(every[scored].mean()), info, emb))
    for floats in (nll.CHUNK_FLOATS, 3 * model.config.vocab_size):  # one chunk; chunks of 6 positions
        monkeypatch.setattr(nll, "CHUNK_FLOATS", floats)
        got = nll.score(model, examples, tok.pad_token_id or 0, "cpu", hidden=True)
        alone = nll.score(model, examples, tok.pad_token_id or 0, "cpu", prompt_info=False)
        for (ce, info, emb), g, a in zip(want, got, alone):
            assert g.answer_ce == pytest.approx(ce, rel=1e-5) and a.answer_ce == pytest.approx(ce, rel=1e-5)
            assert g.prompt_info == pytest.approx(info, rel=1e-5) and a.prompt_info == []
            assert torch.allclose(torch.from_numpy(g.embedding), emb, atol=1e-5)
