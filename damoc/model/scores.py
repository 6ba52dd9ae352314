"""Layer importance from one forward pass over calibration rows.

Forward hooks on the decoder layers read each layer's input and output hidden states:
- Block Influence (ShortGPT): BI_l = 1 - mean over real tokens of cos(h_in, h_out), row-wise
  cosine in fp32, padding masked. (The last entry of `output_hidden_states` is after the final
  norm and would inflate the last layer's score; hooks see the layer's own output.)
- Angular distance (Gromov et al.): d(l, n) = arccos(cos(h_l, h_{l+n})) / pi on each row's last
  real token, averaged over rows, for every block start l and length n.
The same pass gives the calibration loss of the unpruned model (every token) and its answer loss
(the answer tokens: what pruning's damage is measured on).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from damoc.lm.arch import Adapter
from damoc.lm.nll import by_length, next_token_nll, output_head
from damoc.lm.tokens import Example, collate


@dataclass
class Calibration:
    block_influence: list[float]  # per layer
    angular: list[list[float]]  # angular[n - 1][l]: distance from layer l's input to layer l+n-1's output
    loss: float  # mean next-token cross-entropy over the calibration tokens
    tokens: int
    seconds: float
    answer_nll: float = 0.0  # summed over the answer tokens (nats)


def batches(examples: list[Example], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches (input_ids, attention_mask, labels), longest rows together to waste less padding."""
    return [collate([examples[i] for i in idx], pad_id) for idx in by_length(examples, batch_size)]


def _hidden(x) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


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


@dataclass
class Losses:
    every: float  # summed next-token NLL over every real token (nats)
    tokens: int
    answer: float  # summed over the answer tokens (nats)

    @property
    def mean(self) -> float:
        return self.every / max(1, self.tokens)


def forward_losses(model, data: list[dict[str, torch.Tensor]], before_batch=None, every: bool = True) -> Losses:
    """One no-grad forward over the batches: the next-token loss of the answer tokens and, with `every`, of
    every real token, from the same logits (computed a chunk of positions at a time, never batch x length
    x vocabulary; without `every` at the answer positions only); `before_batch(mask)` runs ahead of each
    forward (the probe's hook)."""
    device = model_device(model)
    out = Losses(0.0, 0, 0.0)
    with torch.no_grad():
        for b in data:
            if before_batch is not None:
                before_batch(b["attention_mask"])
            b = {k: v.to(device) for k, v in b.items()}
            real, scored = b["attention_mask"][:, 1:].bool(), b["labels"][:, 1:] != -100
            nll, _ = next_token_nll(model, b, real if every else scored)
            out.answer += float(nll[scored].sum())
            if every:
                out.every += float(nll.sum())
                out.tokens += int(real.sum())
    return out


def calibrate(model, adapter: Adapter, data: list[dict[str, torch.Tensor]]) -> Calibration:
    """One forward pass over the calibration batches: layer scores and the model's losses."""
    t0 = time.perf_counter()
    output_head(model)  # its one-off check is a forward of its own, which the probe must not see
    with LayerProbe(adapter.layer_list(model)) as probe:
        losses = forward_losses(model, data, probe.start_batch)
    return Calibration(probe.block_influence(), probe.angular(), losses.mean, losses.tokens,
                       time.perf_counter() - t0, losses.answer)


def calibration_loss(model, data: list[dict[str, torch.Tensor]]) -> float:
    """Mean next-token cross-entropy over the calibration batches' real tokens (a plain forward pass)."""
    return forward_losses(model, data).mean
