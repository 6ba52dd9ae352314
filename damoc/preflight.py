"""Pre-flight checks of what a spec points at, beyond its schema: local candidate folders read
without loading a weight. `damoc validate` fails on them (exit 2); `damoc select` logs them and
lets the model stage mark those candidates failed while the others run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from damoc.spec import JobSpec, is_uri, resolve_path


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection to the hub (HF_ENDPOINT): offline, configs are not asked for at all rather
    than retried for half a minute each."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def read_header(path: Path) -> tuple[int, dict]:
    """A .safetensors file's header: its length in bytes and its JSON (tensor name -> dtype, shape, offsets)."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n <= 0 or 8 + n > path.stat().st_size:
            raise ValueError(f"header of {n:,d} bytes")
        return n, json.loads(fh.read(n))


def safetensors_problem(path: Path) -> str | None:
    """Whether a .safetensors file is whole, from its header alone: the header parses and the file is as
    long as the tensors it lists (a truncated download is not)."""
    try:
        size = path.stat().st_size
        n, header = read_header(path)
    except ValueError as exc:
        if str(exc).startswith("header of"):
            return f"{path.name} is not a safetensors file or is truncated ({exc}, file {size:,d})"
        return f"{path.name} cannot be read as safetensors: {exc}"
    except OSError as exc:
        return f"{path.name} cannot be read as safetensors: {exc}"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        return f"{path.name} is truncated: its header lists {8 + n + end:,d} bytes, the file has {size:,d}"
    return None


def header_params(folder: Path) -> int | None:
    """Parameters of a local folder's model from its safetensors headers (no weight read), or None."""
    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            header = read_header(path)[1]
        except (OSError, ValueError):
            return None
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total or None


def folder_problems(folder: Path) -> list[str]:
    """What stops a local model folder from loading, read cheaply: its config and its weights' headers."""
    try:
        json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"cannot read {Path(folder) / 'config.json'}: {exc}"]
    return [p for p in map(safetensors_problem, sorted(Path(folder).glob("*.safetensors"))) if p]


def hub_problem(c, i: int, online: bool) -> str | None:
    """A hub candidate that is neither in the local cache nor reachable: said at once, with the fix."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(c.hf, "config.json", revision=c.revision)
    if isinstance(cached, str) or online:
        return None
    why = "HF_HUB_OFFLINE=1" if os.environ.get("HF_HUB_OFFLINE") == "1" else "the hub cannot be reached from here"
    return (f"candidates[{i}].hf: {c.hf} is not in the local Hugging Face cache and {why}: download it where "
            f"there is network (huggingface-cli download {c.hf}) into HF_HOME, or give a local path instead")


def hub_warnings(spec: JobSpec) -> dict[str, str]:
    """{candidate: why} for hub candidates neither cached here nor reachable from here. A warning, not an
    error: the job may run where the hub is reachable (a cluster); where it runs, the model stage fails
    them at once with this."""
    hub = [(i, c) for i, c in enumerate(spec.candidates) if c.hf]
    online = hub_reachable() if hub else True
    found = {c.name: hub_problem(c, i, online) for i, c in hub}
    return {name: line for name, line in found.items() if line}


def candidate_problems(spec: JobSpec, base_dir: str | None = None) -> list[str]:
    """One line per problem, each naming its key path."""
    from damoc.lm.arch import ADAPTERS

    base = base_dir or os.getcwd()
    out = []
    for i, c in enumerate(spec.candidates):
        if not c.path or is_uri(c.path):
            continue  # hub ids (see hub_warnings) and URIs are read where the job runs
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
        weights = sorted(folder.glob("*.safetensors"))
        if not weights and not c.allow_pickle_weights:
            out.append(f"candidates[{i}].path: no .safetensors weights in {folder} (pickle weights are "
                       "only read with allow_pickle_weights: true)")
        out += [f"candidates[{i}].path: {problem}" for problem in map(safetensors_problem, weights) if problem]
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
