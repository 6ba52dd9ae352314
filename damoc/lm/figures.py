"""A candidate's size from its config alone: parameters, decoder layers and the parameters in them, built
on the meta device (no weights read, no memory taken). `damoc plan` projects costs from it and the finetune
stage sizes trials with it where the model stage left no record."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Any

from damoc.spec import JobSpec, resolve_path

LAYER_SHARE = 0.9  # of a model's parameters in its decoder layers, when its config is not readable


@dataclass
class CandidateFigures:
    name: str
    params: float | None
    source: str  # where the parameter count came from: config | spec | unknown
    layers: int | None = None
    layer_params: float | None = None  # parameters in the decoder layers
    note: str = ""
    shape: Any = field(default=None, repr=False)  # damoc.lm.memory.Shape, for the memory estimate

    def params_after(self, prune_ratio: float) -> float | None:
        """Forward parameters once `prune_ratio` of the layers are removed."""
        if self.params is None:
            return None
        in_layers = self.layer_params if self.layer_params is not None else LAYER_SHARE * self.params
        return self.params - prune_ratio * in_layers


def config_params(path_or_id: str, trust_remote_code: bool, revision: str | None, targets: Any = "auto",
                   offline: bool = False) -> tuple[int, int, int, Any]:
    """(parameters, decoder layers, parameters in them, shape for the memory estimate) from a config: the
    model is built on the meta device, so no memory and no weights are touched. Offline, only a cached
    config is read."""
    from damoc.lm.arch import ADAPTERS
    from damoc.lm.memory import meta_model, resolve_targets, shape_of

    config, model = meta_model(path_or_id, trust_remote_code, revision, offline)
    total = sum(p.numel() for p in model.parameters())
    shape = shape_of(model, resolve_targets(config, targets))
    adapter = ADAPTERS.get(getattr(config, "model_type", None))
    if adapter is None:
        return total, 0, 0, shape
    layers = adapter.layer_list(model)
    return total, len(layers), sum(p.numel() for p in layers.parameters()), shape


def candidate_figures(spec: JobSpec, base_dir: str) -> list[CandidateFigures]:
    out = []
    online = None
    for c in spec.candidates:
        where = resolve_path(c.path, base_dir) if c.path else c.hf
        if c.hf and online is None:
            from damoc.preflight import hub_reachable

            online = hub_reachable()  # offline: a cached config is still read, nothing is fetched or retried
        try:
            total, layers, in_layers, shape = config_params(where, c.trust_remote_code, c.revision,
                                                             spec.finetune.lora.target_modules,
                                                             offline=bool(c.hf) and not online)
            out.append(CandidateFigures(c.name, float(total), "config", layers or None, float(in_layers) or None,
                                        shape=shape))
        except Exception as exc:  # noqa: BLE001 - offline hub, missing or odd config: project from what we have
            first = (str(exc).splitlines() or [""])[0]
            reason = f"config not readable ({type(exc).__name__}: {textwrap.shorten(first, 90, placeholder=' ...')})"
            if c.params:
                out.append(CandidateFigures(c.name, float(c.params), "spec", note=reason))
            else:
                out.append(CandidateFigures(c.name, None, "unknown", note=reason + "; set params: in the spec"))
    return out
