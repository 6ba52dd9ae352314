"""Layer importance from one forward pass over calibration rows.

Forward hooks on the decoder layers read each layer's input and output hidden states:
- Block Influence (ShortGPT): BI_l = 1 - mean over real tokens of cos(h_in, h_out), row-wise
  cosine in fp32, padding masked. (The last entry of `output_hidden_states` is after the final
  norm and would inflate the last layer's score; hooks see the layer's own output.)
- Angular distance (Gromov et al.): d(l, n) = arccos(cos(h_l, h_{l+n})) / pi on each row's last
  real token, averaged over rows, for every block start l and length n.
The same pass gives the calibration loss of the unpruned model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from damoc.lm.arch import Adapter


@dataclass
class Calibration:
    block_influence: list[float]  # per layer
    angular: list[list[float]]  # angular[n - 1][l]: distance from layer l's input to layer l+n-1's output
    loss: float  # mean next-token cross-entropy over the calibration tokens
    tokens: int
    seconds: float


def batches(seqs: list[list[int]], batch_size: int, pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded (input_ids, attention_mask) batches, longest rows together to waste less padding."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = []
    for s in range(0, len(order), batch_size):
        chunk = [seqs[i] for i in order[s:s + batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, c in enumerate(chunk):
            ids[i, :len(c)] = torch.tensor(c)
            mask[i, :len(c)] = 1
        out.append((ids, mask))
    return out


def _hidden(x) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


def batch_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over real tokens, and their count."""
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    m = mask[:, 1:].bool()
    return float(nll[m].sum()), int(m.sum())


class LayerProbe:
    """Hooks on every decoder layer: BI sums and each row's last-token state at every boundary."""

    def __init__(self, layers: torch.nn.ModuleList):
        self.layers = layers
        self.bi_sum = torch.zeros(len(layers), dtype=torch.float64)
        self.bi_count = 0
        self.mask: torch.Tensor | None = None
        self.last: torch.Tensor | None = None  # index of each row's last real token
        self.boundaries: list[list[torch.Tensor]] = [[] for _ in range(len(layers) + 1)]
        self._inputs: dict[int, torch.Tensor] = {}
        self._handles = []

    def __enter__(self) -> LayerProbe:
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._post(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def start_batch(self, mask: torch.Tensor) -> None:
        self.mask = mask.bool()
        self.last = mask.sum(1) - 1
        self.bi_count += int(self.mask.sum())

    def _last_tokens(self, h: torch.Tensor) -> torch.Tensor:
        return h[torch.arange(h.shape[0], device=h.device), self.last.to(h.device)].float().cpu()

    def _pre(self, i: int):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self._inputs[i] = h
            self.boundaries[i].append(self._last_tokens(h))
        return hook

    def _post(self, i: int):
        def hook(module, args, output):
            h_in, h_out = self._inputs.pop(i), _hidden(output)
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            self.bi_sum[i] += float((1 - cos)[self.mask.to(cos.device)].sum())
            if i == len(self.layers) - 1:
                self.boundaries[i + 1].append(self._last_tokens(h_out))
        return hook

    def block_influence(self) -> list[float]:
        return (self.bi_sum / max(1, self.bi_count)).tolist()

    def angular(self) -> list[list[float]]:
        states = [torch.cat(b) for b in self.boundaries]  # L+1 tensors of (rows, hidden)
        n_layers = len(self.layers)
        out = []
        for n in range(1, n_layers + 1):
            row = []
            for start in range(n_layers - n + 1):
                cos = torch.nn.functional.cosine_similarity(states[start], states[start + n], dim=-1)
                row.append(float(torch.arccos(cos.clamp(-1, 1)).mean() / math.pi))
            out.append(row)
        return out


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def _forward_loss(model, data: list[tuple[torch.Tensor, torch.Tensor]], before_batch=None) -> tuple[float, int]:
    """Mean next-token cross-entropy over the batches and the token count; `before_batch(mask)`
    runs ahead of each forward (the probe's hook)."""
    device = model_device(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in data:
            if before_batch is not None:
                before_batch(mask)
            ids, mask = ids.to(device), mask.to(device)
            s, c = batch_loss(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, mask)
            total, count = total + s, count + c
    return total / max(1, count), count


def calibrate(model, adapter: Adapter, data: list[tuple[torch.Tensor, torch.Tensor]]) -> Calibration:
    """One forward pass over the calibration batches: layer scores and the model's loss."""
    t0 = time.perf_counter()
    with LayerProbe(adapter.layer_list(model)) as probe:
        loss, count = _forward_loss(model, data, probe.start_batch)
    return Calibration(probe.block_influence(), probe.angular(), loss, count, time.perf_counter() - t0)


def calibration_loss(model, data: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean next-token cross-entropy over the calibration batches (a plain forward pass)."""
    return _forward_loss(model, data)[0]
