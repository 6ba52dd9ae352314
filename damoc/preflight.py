"""Pre-flight checks of what a spec points at, beyond its schema: local candidate folders read
without loading a weight. `damoc validate` fails on them (exit 2); `damoc select` logs them and
lets the model stage mark those candidates failed while the others run."""

from __future__ import annotations

import json
import os
from pathlib import Path

from damoc.spec import JobSpec, is_uri, resolve_path


def candidate_problems(spec: JobSpec, base_dir: str | None = None) -> list[str]:
    """One line per problem, each naming its key path."""
    from damoc.lm.arch import ADAPTERS

    base = base_dir or os.getcwd()
    out = []
    for i, c in enumerate(spec.candidates):
        if not c.path or is_uri(c.path):
            continue  # hub ids and URIs are never fetched offline
        folder = Path(resolve_path(c.path, base))
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            out.append(f"candidates[{i}].path: cannot read {folder / 'config.json'}: {exc}")
            continue
        model_type = config.get("model_type")
        if spec.model.enabled and model_type not in ADAPTERS and not config.get("auto_map"):
            out.append(f"candidates[{i}].path: unsupported architecture: model_type '{model_type}' "
                       f"(the model stage supports {', '.join(sorted(ADAPTERS))})")
        if config.get("auto_map") and not c.trust_remote_code:
            out.append(f"candidates[{i}].trust_remote_code: {folder.name} ships its own modeling code "
                       "(auto_map); it is only run with trust_remote_code: true")
        if not list(folder.glob("*.safetensors")) and not c.allow_pickle_weights:
            out.append(f"candidates[{i}].path: no .safetensors weights in {folder} (pickle weights are "
                       "only read with allow_pickle_weights: true)")
    return out


def data_problems(spec: JobSpec, base_dir: str | None = None, sample: int = 200) -> list[str]:
    """A `data.fields` mapping that matches no column of the local train/eval file (every row would be
    quarantined): one line per missing field, naming the columns the file does have."""
    from damoc.data.normalize import lookup
    from damoc.data.readers import SourceError, sample_records

    base, d = base_dir or os.getcwd(), spec.data
    wanted = {"instruction": d.fields.instruction, "output": d.fields.output}
    if "input" in d.fields.model_fields_set and d.fields.input:  # the default 'input' column is optional
        wanted["input"] = d.fields.input
    out = []
    for key, source in (("data.train", d.train), ("data.eval", d.eval)):
        if not source.path or is_uri(source.path):
            continue
        try:
            path, records = sample_records(source, base, sample)
        except (SourceError, OSError) as exc:
            out.append(f"{key}.path: {exc}")
            continue
        mapped = [r for r in records if not ({"conversations", "messages"} & r.keys())]  # turns need no mapping
        if not mapped:
            continue
        columns = sorted({k for r in mapped for k in r})
        for name, column in wanted.items():
            if all(lookup(r, column) is None for r in mapped):
                out.append(f"data.fields.{name}: no column '{column}' in the first {len(mapped)} rows of {path} "
                           f"(they have: {', '.join(columns[:20])})")
    return out
