"""`damoc runtime-env JOB`: the runtime env a job is submitted with (jobs/submit.sh), so that what its spec
names reaches the cluster.

`ray job submit --working-dir .` uploads the repository less the runtime env's `excludes` (local state:
`zoo`, `runs`, ..., and whatever .gitignore matches). A spec whose relative paths point into an excluded folder (the demo's `zoo/demo/...`)
validates locally and then fails on the cluster with "no such file". Here the excludes are narrowed to
ship exactly the files the spec names under them (every sibling stays excluded), paths that cannot be
shipped are refused with the key that names them, and absolute paths are flagged: they must exist on
every node.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from damoc.spec import JobSpec, is_uri

UPLOAD_LIMIT = 400 * 1024 * 1024  # Ray refuses working dirs over 512 MiB; leave room for the code
PATH_KEYS = ("path", "model", "reference_model", "embedding_model")  # spec fields that name files or folders


def named_paths(spec: JobSpec) -> dict[str, str]:
    """Every local input the spec names ({key path: value}): a path field (outputs are written by the job,
    never uploaded) whose value is absolute or exists relative to the working directory; URIs and hub
    names are fetched where they are read."""
    out: dict[str, str] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{key}[{i}]")
        elif isinstance(node, str) and key.rsplit(".", 1)[-1] in PATH_KEYS and not is_uri(node):
            if os.path.isabs(node) or os.path.exists(node):
                out[key] = node

    walk(spec.model_dump(mode="json"), "")
    return out


def excluded_by(rel: PurePosixPath, pattern: str) -> bool:
    """Whether a plain exclude (a folder or file name, anchored or not; no wildcard) covers `rel`."""
    anchored, name = pattern.startswith("/"), pattern.strip("/")
    parts = PurePosixPath(name).parts
    if anchored or len(parts) > 1:
        return rel.parts[:len(parts)] == parts
    return name in rel.parts


def ship_excludes(needed: list[PurePosixPath], root: Path) -> list[str]:
    """Anchored excludes for everything under the needed paths' top folders except the needed paths
    themselves and the folders that lead to them."""
    keep = {p for n in needed for p in [n, *n.parents] if str(p) != "."}
    out: list[str] = []
    tops = sorted({PurePosixPath(n.parts[0]) for n in needed})

    def prune(folder: PurePosixPath) -> None:
        for entry in sorted((root / folder).iterdir()):
            rel = folder / entry.name
            if rel in needed:
                continue
            if rel in keep and entry.is_dir():
                prune(rel)
            else:
                out.append(f"/{rel}")

    for top in tops:
        if (root / top).is_dir() and top not in needed:
            prune(top)
    return out


def runtime_env_for(spec: JobSpec, base: dict[str, Any], root: Path,
                    spec_file: str | None = None) -> tuple[dict[str, Any], list[str], list[str]]:
    """(the runtime env to submit with, problems that stop the submission, notes). Paths are taken relative
    to `root`, the working directory that is uploaded; the spec file itself is shipped too."""
    problems, notes, needed = [], [], []
    named = named_paths(spec)
    if spec_file:
        named["the spec"] = spec_file
    for key, value in named.items():
        full = Path(value) if os.path.isabs(value) else root / value
        try:
            rel = PurePosixPath(full.resolve().relative_to(root.resolve()).as_posix())
        except ValueError:
            if os.path.isabs(value):
                notes.append(f"{key}: {value} is an absolute path: it must exist on every node of the cluster")
            else:
                problems.append(f"{key}: {value} is outside the working directory {root}: it would not be "
                                "uploaded; use a path under it, a shared volume (absolute path) or a URI")
            continue
        needed.append(rel)
    excludes = list(dict.fromkeys([str(e) for e in base.get("excludes", [])] + gitignored(root)))
    blocking = [e for e in excludes if not any(c in e for c in "*?[") and any(excluded_by(n, e) for n in needed)]
    env = dict(base)
    if blocking:
        env["excludes"] = [e for e in excludes if e not in blocking] + ship_excludes(
            [n for n in needed if any(excluded_by(n, e) for e in blocking)], root)
        notes.append(f"shipped from the excluded {', '.join(blocking)}: "
                     + ", ".join(sorted({str(n) for n in needed if any(excluded_by(n, e) for e in blocking)})))
    size = sum(f.stat().st_size for n in needed for f in _files(root / n))
    if size > UPLOAD_LIMIT:
        problems.append(f"the files the spec names weigh {size / 2**20:.0f} MiB, over what `ray job submit` "
                        f"uploads ({UPLOAD_LIMIT // 2**20} MiB here): put them on a shared volume or in a bucket "
                        "and name them by absolute path or URI")
    return env, problems, notes


def gitignored(root: Path) -> list[str]:
    """The working dir's .gitignore patterns. `ray job submit` leaves out what .gitignore matches, and no
    exclude can take it back: jobs/submit.sh turns that off (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1) and the
    patterns come in here as excludes, where they can be narrowed like the others."""
    path = root / ".gitignore"
    if not path.is_file():
        return []
    lines = (ln.strip() for ln in path.read_text(encoding="utf-8").splitlines())
    return [ln for ln in lines if ln and not ln.startswith(("#", "!"))]


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]


def load_base(path: str) -> dict[str, Any]:
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a runtime env is a mapping")
    return data
