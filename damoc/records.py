"""The files one stage hands to the next, one reader and one writer each: the data manifest, the models
index, a candidate's compression record, the sweep's results, the ranking, and the spec the run was made
with. Every stage and the report read other stages' files only through here.

Each record has a schema: the fields its readers rely on, typed (most may be absent: a stage writes what
applies to it); any other field passes through (a newer version may add some). A reader gets the record as written, once it has been checked against its schema;
a record that does not match (written by another version, or edited by hand) fails with the file and the
field named, never with a KeyError three modules later.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from damoc.rundir import atomic_write_json


class RecordError(ValueError):
    """A stage's file that this version of DaMoC cannot read."""


class Record(BaseModel):
    model_config = ConfigDict(extra="allow")


class Manifest(Record):
    input: int | None = None
    kept: int | None = None
    quarantined: int | None = None
    dropped: dict[str, int] = {}
    readable: int | None = None
    tokens_before: int = 0
    tokens_after: int = 0


class ModelEntry(Record):
    name: str
    status: str  # compressed | original | failed
    path: str | None = None
    reason: str | None = None
    seconds: float = 0.0


class ModelsIndex(Record):
    enabled: bool = True
    candidates: list[ModelEntry]


class Compression(Record):
    status: str | None = None
    params_before: float | None = None
    params_after: float | None = None
    layers_before: int | None = None
    layers_after: int | None = None
    removed: list[int] = []


class TrialRecord(Record):
    name: str
    status: str | None = None
    steps: int = 0
    worker_seconds: float = 0.0


class Results(Record):
    metric: str | None = None
    mode: str | None = None
    candidates: list[TrialRecord]


class RankedCandidate(Record):
    name: str
    status: str | None = None


class Ranking(Record):
    metric: str | None = None
    candidates: list[RankedCandidate]


class EvalRows(Record):
    """A candidate's per-row eval figures at one report (RUN/finetune/eval_rows/<name>/step-N.json)."""

    step: int | None = None
    rows: dict[str, dict[str, float]] = {}


class Marker(Record):
    """A finished stage's marker (RUN/<stage>/_stage.json, written by damoc/pipeline.py)."""

    fingerprint: str | None = None
    seconds: float = 0.0
    counts: dict[str, Any] = {}


# Where each record lives in the run directory.
PATHS: dict[type[Record], str] = {Manifest: "data/manifest.json", ModelsIndex: "models/models.json",
                                  Results: "finetune/results.json", Ranking: "report/ranking.json"}


def check(kind: type[Record], data: Any, where: Path | str) -> dict[str, Any]:
    """`data` checked against `kind`'s schema: itself, or RecordError naming the file and the field."""
    try:
        kind.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise RecordError(f"{where}: {field}: {err['msg']} (a {kind.__name__} record this version of DaMoC "
                          "cannot read: rerun the stage that writes it)") from None
    return data


def load(kind: type[Record], path: Path) -> dict[str, Any] | None:
    """The record at `path`, or None when there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise RecordError(f"{path}: not JSON ({exc})") from None
    return check(kind, data, path)


def read(kind: type[Record], run_dir: Path) -> dict[str, Any] | None:
    """A stage's record in a run directory (PATHS), or None when that stage has not written it."""
    return load(kind, Path(run_dir) / PATHS[kind])


def write(kind: type[Record], path: Path, data: dict[str, Any]) -> Path:
    """A record, checked against its schema, written atomically."""
    return atomic_write_json(path, check(kind, data, path))


def marker(run_dir: Path, output: str) -> dict[str, Any] | None:
    """A stage's marker in a run directory, or None when the stage is not done there."""
    return load(Marker, Path(run_dir) / output / "_stage.json")


def compression(folder: Path) -> dict[str, Any] | None:
    """A candidate's compression record (RUN/models/<name>/compression.json)."""
    return load(Compression, Path(folder) / "compression.json")


def spec_data(run_dir: Path) -> dict[str, Any]:
    """The spec a run was made with, as it was written (RUN/spec.yaml); {} when there is none."""
    import yaml

    try:
        data = yaml.safe_load((Path(run_dir) / "spec.yaml").read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        return {}
    except yaml.YAMLError as exc:
        raise RecordError(f"{Path(run_dir) / 'spec.yaml'}: not YAML ({exc})") from None
    return data if isinstance(data, dict) else {}


def finetune_spec(run_dir: Path):
    """The run's finetune section as a FinetuneSpec (every default filled in), or None without a spec."""
    from damoc.spec import FinetuneSpec

    data = spec_data(run_dir)
    if not data:
        return None
    section = data.get("finetune") or {}
    try:
        return FinetuneSpec.model_validate(section, context={"check_files": False})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in ("finetune", *err["loc"]))
        raise RecordError(f"{Path(run_dir) / 'spec.yaml'}: {field}: {err['msg']}") from None
