"""Nothing is let in by default: no remote code unless the candidate says so, no pickle weights
unless the spec allows them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from damoc.lm.load import load_causal_lm
from damoc.model.compress import Source, load

EVIL = '''from pathlib import Path
Path(__file__).with_name("EXECUTED").write_text("custom code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = "evil_lm"
class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
'''


@pytest.fixture
def custom_code_model(tmp_path, tiny_model):
    """A real tiny model whose config asks for modeling code shipped in the folder."""
    folder = tmp_path / "custom"
    shutil.copytree(tiny_model("llama", layers=2), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="evil_lm", auto_map={"AutoConfig": "evil.EvilConfig",
                                               "AutoModelForCausalLM": "evil.EvilForCausalLM"})
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "evil.py").write_text(EVIL)
    return folder


def test_custom_code_is_refused_unless_trusted(custom_code_model):
    with pytest.raises(ValueError, match="trust_remote_code"):
        load(Source("evil", str(custom_code_model)), torch.float32, "cpu")
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_causal_lm(str(custom_code_model))
    assert not (custom_code_model / "EXECUTED").exists()  # refused before any of it ran


def test_pickle_weights_are_refused_unless_allowed(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "binonly"
    src = tiny_model("llama", layers=2)
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(AutoModelForCausalLM.from_pretrained(src).state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors|model.safetensors"):
        load(Source("bin", str(folder)), torch.float32, "cpu")
    with pytest.raises(OSError):
        load_causal_lm(str(folder))
    _, model = load(Source("bin", str(folder), allow_pickle_weights=True), torch.float32, "cpu")
    assert sum(p.numel() for p in model.parameters()) > 0  # the explicit opt-in works
