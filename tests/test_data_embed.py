"""Sentence-transformers folders read with transformers alone: same vectors as pooling by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import spec_dict

from damoc.data.embed import SentenceEncoder
from damoc.data.lm import LMScorer
from damoc.spec import SpecError, spec_from_data

TEXTS = ["What is 2 plus 3?\n5", "Capital of Peru?\nLima", "def f(x):\n    return x"]


@pytest.fixture(scope="module")
def st_folder(tmp_path_factory, tokenizer_dir):
    """A tiny BERT saved in the sentence-transformers layout: Transformer -> mean Pooling -> Normalize."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = tmp_path_factory.mktemp("st")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, pad_token_id=tok.pad_token_id)).save_pretrained(root)
    tok.save_pretrained(root)
    (root / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}))
    (root / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    return root


def test_encoder_matches_mean_pooling_by_hand(st_folder):
    from transformers import AutoModel, AutoTokenizer

    got = SentenceEncoder(str(st_folder)).encode(TEXTS, batch_size=2)
    tok, model = AutoTokenizer.from_pretrained(st_folder), AutoModel.from_pretrained(st_folder).eval()
    for text, vec in zip(TEXTS, got):  # one at a time: no padding, a plain mean over tokens
        enc = tok(text, return_tensors="pt", truncation=True, max_length=64)
        with torch.no_grad():
            h = model(**enc).last_hidden_state[0].mean(0)
        np.testing.assert_allclose(vec, (h / h.norm()).numpy(), rtol=1e-4, atol=1e-5)
    assert got.shape == (3, 32) and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_scorer_takes_embeddings_from_the_sentence_model(st_folder, lookup_model):
    batch = {"instruction": np.array([t.split("\n")[0] for t in TEXTS], dtype=object),
             "input": np.array([""] * 3, dtype=object),
             "output": np.array([t.split("\n", 1)[1] for t in TEXTS], dtype=object)}
    out = LMScorer(str(lookup_model), embedding_model=str(st_folder))(dict(batch))
    from damoc.lm.prompts import prompt_text

    rendered = [prompt_text("qa", i, "") + o for i, o in zip(batch["instruction"], batch["output"])]  # as trained
    want = SentenceEncoder(str(st_folder)).encode(rendered)
    np.testing.assert_allclose(np.stack(out["embedding"]), want, rtol=1e-5, atol=1e-6)
    assert np.isfinite(out["ifd"]).all()


def test_spec_refuses_a_folder_that_is_not_sentence_transformers(job_dir, tiny_model):
    with pytest.raises(SpecError) as err:
        spec_from_data(spec_dict(**{"data.embedding_model": str(tiny_model("llama"))}), base_dir=str(job_dir))
    assert "data.embedding_model: not a sentence-transformers folder" in str(err.value)
