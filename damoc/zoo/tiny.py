"""Tiny causal LMs built from configs, and a tokenizer trained locally: nothing is downloaded.

Used by the test fixtures and by `damoc zoo build` (text: damoc.zoo.corpus).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "gpt_neox", "opt")


def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `texts`, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def tiny_config(family: str, vocab_size: int, hidden: int = 32, layers: int = 4,
                heads: int = 4, max_positions: int = 512, special_ids: dict[str, int] | None = None) -> Any:
    """A transformers config for `family` at toy scale (hidden 32-64, 2-4 layers in tests)."""
    from transformers import AutoConfig

    ids = special_ids or {}
    common = dict(vocab_size=vocab_size, bos_token_id=ids.get("bos"), eos_token_id=ids.get("eos"),
                  pad_token_id=ids.get("pad"), tie_word_embeddings=False)
    if family in ("llama", "qwen2", "mistral"):
        cfg = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                   num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                   max_position_embeddings=max_positions)
    elif family == "gpt_neox":
        cfg = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                   num_attention_heads=heads, max_position_embeddings=max_positions)
    elif family == "gpt2":
        cfg = dict(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions)
    elif family == "opt":
        cfg = dict(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                   max_position_embeddings=max_positions, word_embed_proj_dim=hidden)
    else:
        raise ValueError(f"unknown family '{family}'; known: {', '.join(FAMILIES)}")
    return AutoConfig.for_model(family, **common, **cfg)


def build_tiny_model(family: str, out_dir: str | Path, tokenizer, hidden: int = 32, layers: int = 4,
                     heads: int = 4, seed: int = 0, max_positions: int = 512) -> Path:
    """Random-init a tiny model of `family` and save it with the tokenizer as an HF folder (safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = {"pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    config = tiny_config(family, len(tokenizer), hidden, layers, heads, max_positions, special_ids=ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
