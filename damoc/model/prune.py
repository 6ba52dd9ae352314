"""Which layers to remove, from the layer scores, and removing them.

After layers are removed, every module attribute `layer_idx` in the kept layers is renumbered:
the KV cache is indexed by it, so a stale index breaks `generate()` with the cache on.
"""

from __future__ import annotations

from contextlib import contextmanager

from damoc.lm.arch import adapter_for


def n_to_remove(num_layers: int, ratio: float, protect_first_last: bool) -> int:
    """round(ratio · L) layers, leaving the protected ones and at least one layer."""
    keep_min = 2 if protect_first_last and num_layers > 2 else 1
    return max(0, min(round(ratio * num_layers), num_layers - keep_min))


def eligible(num_layers: int, protect_first_last: bool) -> list[int]:
    if protect_first_last and num_layers > 2:
        return list(range(1, num_layers - 1))
    return list(range(num_layers))


def choose_discrete(scores: list[float], n: int, protect_first_last: bool) -> list[int]:
    """The n lowest-scoring layers (on a tie, the deeper one goes first)."""
    pool = eligible(len(scores), protect_first_last)
    return sorted(sorted(pool, key=lambda i: (scores[i], -i))[:n])


def choose_last(num_layers: int, n: int, protect_first_last: bool) -> list[int]:
    """The n layers just before the final one (or the last n when nothing is protected): the baseline
    "Reassessing Layer Pruning in LLMs" (ICLR 2026) finds hard to beat once the model is fine-tuned."""
    pool = eligible(num_layers, protect_first_last)
    return pool[len(pool) - n:] if n else []


def choose_contiguous(angular: list[list[float]], n: int, protect_first_last: bool) -> list[int]:
    """The n-layer block whose input and output are closest in angle (Gromov et al.)."""
    if n == 0:
        return []
    num_layers = len(angular)
    pool = set(eligible(num_layers, protect_first_last))
    starts = [s for s in range(num_layers - n + 1) if all(i in pool for i in range(s, s + n))]
    if not starts:
        raise ValueError(f"no block of {n} layers avoids the protected first and last layers")
    best = min(starts, key=lambda s: (angular[n - 1][s], -s))
    return list(range(best, best + n))


def remove_layers(model, removed: list[int]) -> int:
    """Delete the layers at `removed` in place; fix the config and layer indices. Returns the new count."""
    adapter = adapter_for(model.config)
    layers = adapter.layer_list(model)
    drop = set(removed)
    kept = [layer for i, layer in enumerate(layers) if i not in drop]
    if not kept:
        raise ValueError("cannot remove every layer")
    import torch

    adapter.set_layer_list(model, torch.nn.ModuleList(kept))
    setattr(model.config, adapter.count_key, len(kept))
    for key in adapter.per_layer_keys:
        values = getattr(model.config, key, None)
        if isinstance(values, list) and len(values) == len(layers):
            setattr(model.config, key, [v for i, v in enumerate(values) if i not in drop])
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    return len(kept)


@contextmanager
def layers_removed(model, removed: list[int]):
    """The model without the layers at `removed` inside the block, as it was after it (layers, config
    counts, layer indices): to measure the damage of several choices on one loaded model."""
    adapter = adapter_for(model.config)
    layers = adapter.layer_list(model)
    keys = [k for k in (adapter.count_key, *adapter.per_layer_keys) if hasattr(model.config, k)]
    saved = {k: getattr(model.config, k) for k in keys}
    indices = [(m, m.layer_idx) for layer in layers for m in layer.modules() if hasattr(m, "layer_idx")]
    remove_layers(model, removed)
    try:
        yield model
    finally:
        adapter.set_layer_list(model, layers)
        for k, v in saved.items():
            setattr(model.config, k, v)
        for module, idx in indices:
            module.layer_idx = idx
