"""Sentence embeddings from a local sentence-transformers folder, read with transformers alone.

A sentence-transformers folder is a transformers encoder plus `modules.json` naming its
pipeline: Transformer -> Pooling (`1_Pooling/config.json`: mean, cls or max over tokens)
[-> Normalize]. Reading that format directly gives the same vectors without adding the
sentence-transformers package (and its dependencies) to every worker.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

POOLING_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                "pooling_mode_max_tokens": "max"}


def read_pipeline(path: Path) -> tuple[str, bool, int | None]:
    """(pooling mode, normalize?, max_seq_length) from the folder's module files."""
    modules = json.loads((path / "modules.json").read_text())
    kinds = {m["type"].rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
    if "Transformer" not in kinds or "Pooling" not in kinds:
        raise ValueError(f"{path}: modules.json must list a Transformer and a Pooling module, has {sorted(kinds)}")
    pooling = json.loads((path / kinds["Pooling"] / "config.json").read_text())
    modes = [mode for key, mode in POOLING_KEYS.items() if pooling.get(key)]
    if len(modes) != 1:
        raise ValueError(f"{path}: one pooling mode (mean, cls or max) is supported, config has {modes or 'none'}")
    max_len = None
    st_cfg = path / kinds["Transformer"] / "sentence_bert_config.json"
    if st_cfg.is_file():
        max_len = json.loads(st_cfg.read_text()).get("max_seq_length")
    return modes[0], "Normalize" in kinds, max_len


class SentenceEncoder:
    """encode(texts) -> float32 (n, dim), pooled and (as the folder says) L2-normalised."""

    def __init__(self, path: str, max_length: int = 256, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        root = Path(path)
        self.mode, self.normalize, st_max = read_pipeline(root)
        self.max_length = min(max_length, st_max or max_length)
        self.tok = AutoTokenizer.from_pretrained(root)
        self.model = AutoModel.from_pretrained(root, use_safetensors=True).to(device).eval()
        self.device = device

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        import torch

        out = []
        for s in range(0, len(texts), batch_size):
            enc = self.tok(texts[s:s + batch_size], padding=True, truncation=True, max_length=self.max_length,
                           return_tensors="pt").to(self.device)
            with torch.no_grad():
                h = self.model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            if self.mode == "mean":
                v = (h * mask).sum(1) / mask.sum(1).clamp(min=1)
            elif self.mode == "cls":
                v = h[:, 0]
            else:
                v = h.masked_fill(mask == 0, -1e9).max(1).values
            if self.normalize:
                v = torch.nn.functional.normalize(v, dim=-1)
            out.append(v.cpu().numpy().astype(np.float32))
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)
