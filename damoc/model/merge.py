"""Sparse merging of removed layers into kept ones: pure tensor functions.

For a kept layer K and the removed layers R_1..R_m merged into it, per weight matrix
(2-D parameters; norms and biases stay the kept layer's):

- ties:            delta_i = W_Ri - W_K, trimmed to the top `density` by |delta|; the sign
                   of Σ trimmed deltas is elected per entry; entries that disagree with it are
                   dropped; W_K + λ · (Σ agreeing) / (number agreeing)  (TIES' disjoint mean).
- dare:            as ties, but the trim is a random drop keeping `density` of the entries,
                   rescaled by n / kept so the expected sum is unchanged.
- task_arithmetic: W_K + λ · mean_i delta_i  (no trim, no election).
- sign_agree:      W_K + λ · Σ_i mask_i ⊙ W_Ri, mask_i = top `density` of |W_Ri| among the
                   entries whose sign agrees with W_K's.
Naively adding whole differences collapses models (LaCo's known failure); the stage measures
original, plain-pruned and merged calibration loss so every merge shows what it did.

Methods are registered by name (`merge_method`); `model.merge.method` takes the registry's names. torch is
imported where a method runs, so the spec reads the names without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# name -> update(kept fp32, removed fp32 list, density, generator): what is added (x scale) to the kept weight.
MERGE_METHODS: dict[str, Callable | None] = {"none": None}


def merge_method(name: str):
    """Register a merge method's update function under `name`."""
    def register(fn: Callable) -> Callable:
        if name in MERGE_METHODS:
            raise ValueError(f"merge method '{name}' is registered twice")
        MERGE_METHODS[name] = fn
        return fn
    return register


def keep_count(n: int, density: float) -> int:
    """Entries a `density` keeps out of n: round(d·n), at least one."""
    return max(1, min(n, round(density * n)))


def topk_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of exactly round(density·n) entries with the largest |x| (ties broken by position)."""
    import torch

    flat = x.detach().abs().flatten().float()
    idx = torch.topk(flat, keep_count(flat.numel(), density), sorted=False).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[idx] = True
    return mask.view_as(x)


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the top `density` of entries by magnitude, zero the rest."""
    return delta * topk_mask(delta, density)


def dare(delta: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE: keep a random `density` of the entries (exactly round(d·n)), rescaled by n/kept so that
    the expected sum over the random choice equals the original sum."""
    import torch

    n = delta.numel()
    k = keep_count(n, density)
    idx = torch.randperm(n, generator=generator)[:k]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return delta * mask.view_as(delta).to(delta.device) * (n / k)


def elect_and_mean(deltas: list[torch.Tensor]) -> torch.Tensor:
    """TIES sign election and disjoint mean: per entry, the mean of the deltas whose sign agrees
    with the sign of their sum (zero where none agrees)."""
    import torch

    stack = torch.stack(deltas)
    sign = torch.sign(stack.sum(0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    total = (stack * agree).sum(0)
    count = agree.sum(0).clamp(min=1)
    return total / count


@merge_method("ties")
def ties_update(k: torch.Tensor, rs: list[torch.Tensor], density: float, generator=None) -> torch.Tensor:
    return elect_and_mean([trim(r - k, density) for r in rs])


@merge_method("dare")
def dare_update(k: torch.Tensor, rs: list[torch.Tensor], density: float, generator=None) -> torch.Tensor:
    return elect_and_mean([dare(r - k, density, generator) for r in rs])


@merge_method("task_arithmetic")
def task_arithmetic_update(k: torch.Tensor, rs: list[torch.Tensor], density: float, generator=None) -> torch.Tensor:
    import torch

    return torch.stack([r - k for r in rs]).mean(0)


@merge_method("sign_agree")
def sign_agree_update(k: torch.Tensor, rs: list[torch.Tensor], density: float, generator=None) -> torch.Tensor:
    import torch

    update = torch.zeros_like(k)
    for r in rs:
        agree = torch.sign(r) == torch.sign(k)
        # Rank by magnitude among the agreeing entries only.
        update += r * topk_mask(torch.where(agree, r, torch.zeros_like(r)), density) * agree
    return update


def merge_matrix(kept: torch.Tensor, removed: list[torch.Tensor], method: str, density: float,
                 scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The merged weight of one kept matrix. Computed in fp32, returned in the kept dtype."""
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method '{method}'; known: {', '.join(MERGE_METHODS)}")
    update = MERGE_METHODS[method]
    if update is None or not removed:
        return kept
    k = kept.float()
    return (k + scale * update(k, [r.float() for r in removed], density, generator)).to(kept.dtype)


def merge_targets(removed: list[int], num_layers: int) -> dict[int, list[int]]:
    """Which kept layer each removed layer merges into: its nearest kept neighbour, the
    preceding one on a tie (a removed block folds into the layer before it, as in LaCo)."""
    kept = [i for i in range(num_layers) if i not in set(removed)]
    if not kept:
        raise ValueError("every layer would be removed")
    out: dict[int, list[int]] = {}
    for r in removed:
        k = min(kept, key=lambda i: (abs(i - r), i > r))
        out.setdefault(k, []).append(r)
    return out


def merge_layers(layers, removed: list[int], method: str, density: float, scale: float,
                 seed: int = 0) -> dict[str, int]:
    """Merge each removed layer's 2-D weights into its kept neighbour, in place. `layers` is the
    model's original layer list (before deletion). Returns entries changed per kept layer."""
    if MERGE_METHODS.get(method) is None or not removed:
        return {}
    import torch

    gen = torch.Generator().manual_seed(seed)
    changed: dict[str, int] = {}
    for k, rs in merge_targets(removed, len(layers)).items():
        kept_params = dict(layers[k].named_parameters())
        others = [dict(layers[r].named_parameters()) for r in rs]
        n = 0
        with torch.no_grad():
            for name, w in kept_params.items():
                if w.ndim < 2 or any(name not in o or o[name].shape != w.shape for o in others):
                    continue
                new = merge_matrix(w.data, [o[name].data for o in others], method, density, scale, gen)
                n += int((new != w.data).sum())
                w.data.copy_(new)
        changed[str(k)] = n
    return changed

