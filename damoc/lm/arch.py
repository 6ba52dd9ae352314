"""Architecture adapters: where a decoder-only family keeps its layers and which modules LoRA targets.

Each adapter knows the dotted path of the decoder-layer list, the config key holding the layer
count, and which per-layer config lists (`layer_types`) must follow a deletion (the model stage
removes layers; the finetune stage attaches LoRA; `damoc validate` reads the supported names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `damoc validate` reads ADAPTERS: it should not have to import torch
    import torch


@dataclass(frozen=True)
class Adapter:
    layers: str  # dotted path of the decoder-layer ModuleList on the *ForCausalLM model
    count_key: str = "num_hidden_layers"
    per_layer_keys: tuple[str, ...] = ("layer_types",)
    # LoRA targets for `finetune.lora.target_modules: auto`: attention and MLP projections.
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def layer_list(self, model) -> torch.nn.ModuleList:
        obj = model
        for part in self.layers.split("."):
            obj = getattr(obj, part)
        return obj

    def set_layer_list(self, model, layers: torch.nn.ModuleList) -> None:
        parent_path, _, last = self.layers.rpartition(".")
        parent = model
        for part in parent_path.split(".") if parent_path else []:
            parent = getattr(parent, part)
        setattr(parent, last, layers)

    def num_layers(self, config) -> int:
        return int(getattr(config, self.count_key))


LLAMA_LIKE = Adapter("model.layers")
ADAPTERS: dict[str, Adapter] = {
    **{t: LLAMA_LIKE for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2",
                               "gemma3_text", "phi3", "olmo", "olmo2", "granite", "cohere", "smollm3")},
    "gpt2": Adapter("transformer.h", count_key="n_layer", lora_targets=("c_attn", "c_proj", "c_fc")),
    "gpt_neox": Adapter("gpt_neox.layers",
                        lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
    "opt": Adapter("model.decoder.layers", lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")),
}


class UnsupportedArchitecture(ValueError):
    pass


def adapter_for(config) -> Adapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedArchitecture(
            f"unsupported architecture: model_type '{model_type}'; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type]
