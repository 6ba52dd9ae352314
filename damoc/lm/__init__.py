"""The one language-model layer every stage uses.

- `load`: loading a causal LM and its tokenizer (safetensors only unless a candidate allows pickle
  weights, `trust_remote_code` only when the candidate says so, HF_TOKEN from the environment).
- `prompts`: one prompt template per task kind, or the tokenizer's chat template; the same text
  for layer calibration, IFD, token compression, training and evaluation.
- `tokens`: prompt + answer -> token ids with the loss on the answer only.
- `nll`: batched forward passes: answer NLL per token and per UTF-8 byte, prompt self-information.
- `arch`: where each architecture keeps its decoder layers and LoRA targets.
Stages import this layer and the run directory, never each other.
"""
