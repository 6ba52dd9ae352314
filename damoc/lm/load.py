"""Loading a causal LM and its tokenizer: one set of rules for every stage.

Weights are read from safetensors only, unless the candidate sets `allow_pickle_weights`; code
shipped with a model runs only with `trust_remote_code`; a gated hub model gets HF_TOKEN from the
environment (never from a file). A tokenizer without a pad token pads with its EOS.
"""

from __future__ import annotations

import os


def hf_token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def pad_id(tok) -> int:
    """The id padding uses: the pad token, else EOS, else 0."""
    for t in (tok.pad_token_id, tok.eos_token_id):
        if t is not None:
            return int(t)
    return 0


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision,
                                        token=hf_token())
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, *, trust_remote_code: bool = False, revision: str | None = None,
                   allow_pickle: bool = False, dtype=None, device="cpu"):
    """Tokenizer and model (eval mode, fp32 unless `dtype` says otherwise) from a folder or hub id."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(path, trust_remote_code, revision)
    model = AutoModelForCausalLM.from_pretrained(
        path, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype or torch.float32,
        use_safetensors=None if allow_pickle else True, low_cpu_mem_usage=True, token=hf_token())
    model.to(device).eval()
    return tok, model


def weight_bytes(path: str) -> float:
    """Bytes of a local folder's safetensors weights (inf when there are none): the cheapest
    candidate to use as a reference LM has the fewest."""
    import math
    from pathlib import Path

    files = list(Path(path).glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else math.inf


def local_config(path) -> dict | None:
    """A local folder's config.json as a dict (None: not readable, or a hub id)."""
    import json
    from pathlib import Path

    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


WINDOW_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length")


def context_window(path_or_config) -> int | None:
    """The longest sequence a model's config allows: a loaded config, or a local folder's config.json
    (None: not readable, or a hub id)."""
    from pathlib import Path

    if isinstance(path_or_config, (str, Path)):
        config = local_config(path_or_config)
        if config is None:
            return None
    else:
        config = path_or_config.to_dict()
    found = [int(config[k]) for k in WINDOW_KEYS if isinstance(config.get(k), int) and config[k] > 0]
    return min(found) if found else None


def within_window(length: int, path_or_config) -> int:
    """`length`, cut to the model's context window where its config says it is shorter: a sequence longer
    than a model's positions fails with an index error (a GPT-2 with 256 positions)."""
    window = context_window(path_or_config)
    return window if window is not None and window < length else length


def modeling_module(path: str) -> str | None:
    """The transformers module of a local folder's architecture, named from config.json's model_type
    (None: not readable, or a hub id): what loading the model imports first."""
    kind = (local_config(path) or {}).get("model_type")
    if not isinstance(kind, str) or not kind.replace("-", "_").isidentifier():
        return None
    kind = kind.replace("-", "_")
    return f"transformers.models.{kind}.modeling_{kind}"
