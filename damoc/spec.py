"""JobSpec: the whole DaMoC job as strict pydantic v2 models, loaded from YAML.

Every model forbids unknown keys, so a typo is an error rather than a silently
ignored knob. Defaults suit the local demo on the embedded cluster.
`load_spec` never touches the network and never starts Ray: it is what
`damoc validate` runs, and what every other command runs first.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from damoc.model.merge import MERGE_METHODS
from damoc.schedule import SCHEDULERS

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
HUB_ID = re.compile(r"(?=.{1,96}$)[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
URI_RE = re.compile(r"^[a-z][a-z0-9+.-]*://")


class SpecError(Exception):
    """A spec that cannot be used; `problems` holds one 'key.path: message' per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def is_uri(path: str) -> bool:
    return bool(URI_RE.match(path))


def resolve_path(path: str, base_dir: str | os.PathLike | None) -> str:
    """Relative local paths are taken against base_dir (the working directory by default)."""
    if is_uri(path) or os.path.isabs(path):
        return path
    return str(Path(base_dir or os.getcwd()) / path)


def _check_exists(path: str | None, info: ValidationInfo, want_dir: bool = False) -> str | None:
    """Fail validation for a missing local path (URIs are checked where they are read)."""
    ctx = info.context or {}
    if path is None or not ctx.get("check_files", False) or is_uri(path):
        return path
    full = resolve_path(path, ctx.get("base_dir"))
    if not os.path.exists(full):
        raise ValueError(f"no such file: {full}")
    if want_dir and not os.path.isdir(full):
        raise ValueError(f"not a directory: {full}")
    return path


# ---------------------------------------------------------------- data


def _hub_id(v: str | None) -> str | None:
    """A Hugging Face repo id as the hub accepts it: `name` or `owner/name`."""
    if v is not None and not HUB_ID.fullmatch(v):
        raise ValueError(f"{v!r} is not a Hugging Face hub id (owner/name: letters, digits, '-', '_', '.'; "
                         "at most 96 characters)")
    return v


HubId = Annotated[str | None, AfterValidator(_hub_id)]


class DataSource(Strict):
    """A local file/folder (jsonl | json | parquet | csv) or a Hugging Face dataset (with
    `config`, `revision` and `data_files` as `datasets.load_dataset` takes them)."""

    path: str | None = None
    hf: HubId = None
    split: str = "train"
    config: str | None = None  # load_dataset's `name`
    revision: str | None = None
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    format: Literal["auto", "jsonl", "json", "parquet", "csv"] = "auto"
    rows: int | None = Field(default=None, gt=0)  # expected rows, for `damoc plan` where it cannot read the source

    @field_validator("path")
    @classmethod
    def _path_exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        return _check_exists(v, info)

    @model_validator(mode="after")
    def _one_source(self) -> DataSource:
        if (self.path is None) == (self.hf is None):
            raise ValueError("give exactly one of 'path' or 'hf'")
        hub_only = [k for k in ("config", "revision", "data_files") if getattr(self, k) is not None]
        if self.path is not None and hub_only:
            raise ValueError(f"{', '.join(hub_only)} only apply to a hub data set ('hf')")
        return self


class EvalSource(DataSource):
    """Held-out rows: a source of their own, or a seeded split of the train rows."""

    split_ratio: float | None = Field(default=None, gt=0, lt=1)

    @model_validator(mode="after")
    def _one_source(self) -> EvalSource:
        given = [k for k in ("path", "hf", "split_ratio") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'path', 'hf' or 'split_ratio'")
        return self


class Fields(Strict):
    """Column names in the user's data, mapped onto instruction / input / output."""

    instruction: str = "instruction"
    input: str | None = "input"
    output: str = "output"


class OperatorSpec(Strict):
    """One data operator by registered name, with its parameters."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)


class FilterSpec(Strict):
    method: Literal["none", "distribution", "quality", "hybrid"] = "hybrid"
    keep_ratio: float = Field(default=0.2, gt=0, le=1)
    # An explicit chain replaces the method's default chain.
    operators: list[OperatorSpec] | None = None


class CompressSpec(Strict):
    enabled: bool = True
    ratio: float = Field(default=0.6, gt=0, le=1)  # fraction of prompt tokens kept
    forced_tokens: list[str] = Field(default_factory=list)
    compress_answer: bool = False
    # word: a word is kept or dropped whole (readable, LLMLingua-2); token: each subword piece alone
    # (Selective Context's original cut: denser, not always readable)
    granularity: Literal["word", "token"] = "word"


class RewriteSpec(Strict):
    enabled: bool = False
    model: str | None = None
    endpoint: str | None = None
    rounds: int = Field(default=2, ge=1, le=10)

    @model_validator(mode="after")
    def _needs_a_writer(self) -> RewriteSpec:
        if self.enabled and not (self.model or self.endpoint):
            raise ValueError("rewrite.enabled needs 'model' or 'endpoint'")
        return self


class DataSpec(Strict):
    train: DataSource
    eval: EvalSource = Field(default_factory=lambda: EvalSource(split_ratio=0.1))
    fields: Fields = Field(default_factory=Fields)
    task: Literal["qa", "reading_comprehension", "multiple_choice"] = "qa"
    filter: FilterSpec = Field(default_factory=FilterSpec)
    compress: CompressSpec = Field(default_factory=CompressSpec)
    rewrite: RewriteSpec = Field(default_factory=RewriteSpec)
    # The causal LM behind perplexity, IFD, embeddings and token compression
    # (a local folder or hub id); default: the candidates themselves, as reference_lm says.
    reference_model: str | None = None
    # Without a reference_model: "shared" (default): every loadable local candidate scores an equal,
    # seeded share of the rows (drawn from each row's content), and budgeted selection picks from each
    # share by its own scorer's stats, so the data cannot favour one candidate; each row costs one
    # forward pass of one candidate. "smallest": the smallest candidate scores every row (cheapest;
    # its own judgement decides what every candidate trains on).
    reference_lm: Literal["shared", "smallest"] = "shared"
    # Embeddings for k-center, cluster balance and DEITA: a local sentence-transformers folder,
    # or (default) mean-pooled hidden states of the reference LM.
    embedding_model: str | None = None
    batch_size: int = Field(default=64, gt=0)  # rows per batch for model-based operators
    max_length: int = Field(default=256, gt=0)  # tokens the reference LM reads per row
    num_actors: int = Field(default=1, gt=0)  # actor pool size per model-based operator
    num_gpus_per_actor: float = Field(default=0, ge=0)

    @field_validator("embedding_model")
    @classmethod
    def _sentence_transformers_folder(cls, v: str | None, info: ValidationInfo) -> str | None:
        v = _check_exists(v, info, want_dir=True)
        ctx = info.context or {}
        if v is not None and ctx.get("check_files"):
            if not (Path(resolve_path(v, ctx.get("base_dir"))) / "modules.json").is_file():
                raise ValueError("not a sentence-transformers folder (no modules.json)")
        return v

    @model_validator(mode="after")
    def _known_operators(self) -> DataSpec:
        from damoc.data.ops import get_operator

        problems = []
        for i, op in enumerate(self.filter.operators or []):
            try:
                get_operator(op.name).Params(**op.params)
            except ValidationError as exc:
                problems += [f"filter.operators[{i}] ({op.name}) {line}" for line in format_validation_error(exc)]
            except ValueError as exc:
                problems.append(f"filter.operators[{i}]: {exc}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# ---------------------------------------------------------------- candidates


class Candidate(Strict):
    """A model on the shortlist: a local HF folder or a hub id (hub ids are never checked offline)."""

    name: str = Field(pattern=NAME_PATTERN, max_length=64)
    path: str | None = None
    hf: HubId = None
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False
    params: float | None = Field(default=None, gt=0)  # for `damoc plan` where the config cannot be read

    @field_validator("path")
    @classmethod
    def _folder_exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        v = _check_exists(v, info, want_dir=True)
        ctx = info.context or {}
        if v is not None and ctx.get("check_files") and not is_uri(v):
            cfg = Path(resolve_path(v, ctx.get("base_dir"))) / "config.json"
            if not cfg.is_file():
                raise ValueError(f"no config.json in {cfg.parent}")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> Candidate:
        if (self.path is None) == (self.hf is None):
            raise ValueError("give exactly one of 'path' or 'hf'")
        return self


# ---------------------------------------------------------------- model stage


class MergeSpec(Strict):
    # Default from bench/layer_merge.py on a real 30-layer LLM (SmolLM2-135M-Instruct): no merge method
    # at any density or scale beat plain pruning on held-out loss; every one approached it only as its
    # scale went to 0 (on a pretrained toy, sign_agree at 0.1 was about even). Merging stays one key away.
    method: Literal[tuple(MERGE_METHODS)] = "none"  # type: ignore[valid-type] - damoc/model/merge.py's registry
    density: float = Field(default=0.2, gt=0, le=1)
    scale: float = Field(default=0.1, gt=0)


class CalibrationSpec(Strict):
    rows: int = Field(default=64, gt=0)
    max_length: int = Field(default=256, gt=0)
    batch_size: int = Field(default=8, gt=0)


class ModelSpec(Strict):
    enabled: bool = True
    # Which layers go first: lowest Block Influence, lowest angular distance, or the last ones before the
    # final layer (last_layers; the baseline of "Reassessing Layer Pruning in LLMs", ICLR 2026).
    score: Literal["block_influence", "angular", "last_layers"] = "block_influence"
    prune: Literal["discrete", "contiguous"] = "discrete"
    # A fixed fraction of the layers, or auto: as many as keep the calibration answer loss (bits per byte
    # on the domain's rows) within max_damage of the original's (relative), never more than max_prune_ratio.
    # Real LLMs are far less redundant than toy ones: a fixed half wrecks them (see DESIGN.md).
    prune_ratio: float | Literal["auto"] = "auto"
    max_damage: float = Field(default=0.1, gt=0)
    max_prune_ratio: float = Field(default=0.5, gt=0, lt=1)
    protect_first_last: bool = True
    merge: MergeSpec = Field(default_factory=MergeSpec)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    num_cpus: float = Field(default=1, gt=0)
    num_gpus: float = Field(default=0, ge=0)


# ---------------------------------------------------------------- finetune stage


    @field_validator("prune_ratio", mode="before")
    @classmethod
    def _ratio_or_auto(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1):
            return v
        raise ValueError("must be a fraction of the layers in [0, 1), or auto")


class LoraSpec(Strict):
    r: int = Field(default=8, gt=0)
    alpha: float = Field(default=16, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    # "auto": per-family attention/MLP projections; "all-linear": every linear layer.
    target_modules: Literal["auto", "all-linear"] | list[str] = "auto"


class DeepSpeedSpec(Strict):
    enabled: bool = True
    zero_stage: Literal[0, 1, 2, 3] = 2


class FinetuneSpec(Strict):
    method: Literal["lora", "full"] = "lora"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    # auto: bf16 on GPU (fp16 where bf16 is missing), fp32 on CPU (faster there without AMX).
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    num_workers: int = Field(default=2, gt=0)
    # How a trial runs its workers. `workers`: a Ray Train worker group (controller and one actor per
    # worker, started per trial); `local`: Ray Train's local mode inside the Tune trial's own process,
    # reused by the next trial (one worker only; no per-trial process start-up); auto: local for one
    # worker, workers otherwise.
    executor: Literal["auto", "local", "workers"] = "auto"
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    max_steps: int = Field(default=200, gt=0)
    # Passes over RUN/data/train.parquet; steps = ceil(epochs x rows / (batch x workers x accum)),
    # never more than max_steps. None: max_steps. Less data then means fewer steps, as in the paper.
    epochs: float | None = Field(default=None, gt=0)
    batch_size: int = Field(default=8, gt=0)  # per worker, per micro-step
    grad_accum: int = Field(default=1, gt=0)
    lr: float = Field(default=2e-4, gt=0)
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    max_length: int = Field(default=512, gt=0)
    # The prompt every stage builds (damoc/lm/prompts.py): plain (the task's template), chat (the
    # tokenizer's chat template), auto (chat where the tokenizer has one).
    template: Literal["auto", "plain", "chat"] = "auto"
    eval_every: int = Field(default=20, gt=0)
    # Eval rows scored at each evaluation: the first N of RUN/data/eval.parquet, the same for every
    # candidate (None: all of them; generation metrics decode each one).
    eval_max_rows: int | None = Field(default=512, gt=0)
    max_failures: int = Field(default=1, ge=0)
    storage_path: str | None = None  # shared mount or URI on multi-node clusters

    @model_validator(mode="after")
    def _precision_fits_device(self) -> FinetuneSpec:
        # DeepSpeed refuses fp16 on CPU ("not supported on your device").
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision fp16 needs use_gpu: true (use bf16 on CPU)")
        if self.executor == "local" and self.num_workers != 1:
            raise ValueError("executor local runs one worker: set num_workers: 1 (or executor: workers)")
        return self

    @property
    def local(self) -> bool:
        """Whether trials run Ray Train's local mode in their own (reused) process."""
        return self.executor == "local" or (self.executor == "auto" and self.num_workers == 1)


class TuneSpec(Strict):
    scheduler: Literal[tuple(SCHEDULERS)] = "asha"  # type: ignore[valid-type] - damoc/schedule.py's registry
    # Steps before ASHA may stop a trial, or auto (the default): the longest grace period whose schedule
    # trains at most 1/target_saving of what fine-tuning every candidate in full would (rows x parameters:
    # the evidence scales with the bill; see damoc/plan.py::grace_for_saving), never under
    # min_grace_period. bench/results/selection.md checks its ranking where zero-shot loss's is wrong.
    grace_period: int | Literal["auto"] = "auto"
    target_saving: float = Field(default=50, gt=1)
    min_grace_period: int = Field(default=2, gt=0)
    reduction_factor: float = Field(default=2, gt=1)
    max_concurrent_trials: int | None = Field(default=None, gt=0)
    # Running trials wait for each other at every ASHA rung (see damoc/train/rungs.py), so what
    # ASHA stops does not depend on which trial happens to run faster.
    sync_rungs: bool = True
    rung_timeout_s: float = Field(default=900, gt=0)
    # A synchronised rung stops a trial below ASHA's cut only when the ranking is steady: it was below
    # the cut at its previous evaluation too (if one came after training began), and it is outside the
    # kept ones in at least this share of paired resamples of the eval rows. Otherwise it goes on (the
    # ranking wins over the saving; the report says which saving was reached). 0: ASHA's cut alone.
    stop_confidence: float = Field(default=0.9, ge=0, lt=1)
    # The selection is decided once ASHA has stopped every candidate but one: false stops that one
    # there (it ranks first whatever it does next); true trains it to its planned steps.
    finish_winner: bool = False
    # Experiment tracking with Tune's own logger callbacks (off by default): tensorboard (tensorboardX;
    # event files in each trial's folder of the sweep's state), mlflow (to `mlflow_uri`, default a file
    # store beside the sweep), wandb (WANDB_API_KEY from the environment).
    callbacks: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list)
    mlflow_uri: str | None = None

    @field_validator("grace_period", mode="before")
    @classmethod
    def _steps_or_auto(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            return v
        raise ValueError("must be a number of steps > 0, or auto")


class SelectSpec(Strict):
    metric: Literal["eval_loss", "exact_match", "rouge_l", "accuracy"] = "eval_loss"
    max_new_tokens: int = Field(default=32, gt=0)

    @property
    def mode(self) -> Literal["min", "max"]:
        return "min" if self.metric == "eval_loss" else "max"


# ---------------------------------------------------------------- the job


def _get(data: Any, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if not isinstance(data, dict) or k not in data:
            return default
        data = data[k]
    return data


def duplicate_names(data: Any) -> list[str]:
    cands = data.get("candidates") if isinstance(data, dict) else None
    names = [c.get("name") for c in cands if isinstance(c, dict)] if isinstance(cands, list) else []
    dups = sorted({n for n in names if isinstance(n, str) and names.count(n) > 1})
    return [f"candidates: duplicate candidate name '{n}'" for n in dups]


def cross_checks(data: Any) -> list[str]:
    """Checks across sections, on the raw mapping too: `spec_from_data` reports them beside every
    other problem in one pass (pydantic runs a whole-spec check only once each part is valid)."""
    out = duplicate_names(data)
    # Unset keys take the fields' own defaults (a figure written here would drift from them).
    grace = _get(data, "tune", "grace_period", default=TuneSpec.model_fields["grace_period"].default)
    steps = _get(data, "finetune", "max_steps", default=FinetuneSpec.model_fields["max_steps"].default)
    scheduler = _get(data, "tune", "scheduler", default=TuneSpec.model_fields["scheduler"].default)
    if scheduler in SCHEDULERS and SCHEDULERS[scheduler].stops_early and isinstance(grace, int) and \
            isinstance(steps, int) and grace > steps:
        out.append(f"(top level): tune.grace_period ({grace}) exceeds finetune.max_steps ({steps})")
    if _get(data, "select", "metric") == "accuracy" and _get(data, "data", "task", default="qa") != "multiple_choice":
        out.append("(top level): select.metric accuracy scores a choice among options; it needs "
                   "data.task: multiple_choice (use eval_loss, exact_match or rouge_l)")
    return out


class JobSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN, max_length=64)
    output_dir: str | None = None  # default: runs/<name>
    seed: int = Field(default=0, ge=0)
    data: DataSpec
    candidates: list[Candidate] = Field(min_length=1)
    model: ModelSpec = Field(default_factory=ModelSpec)
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    tune: TuneSpec = Field(default_factory=TuneSpec)
    select: SelectSpec = Field(default_factory=SelectSpec)

    @model_validator(mode="after")
    def _defaults_and_cross_checks(self) -> JobSpec:
        if self.output_dir is None:
            self.output_dir = f"runs/{self.name}"
        problems = cross_checks(self.model_dump(mode="json"))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def section(self, *keys: str) -> dict[str, Any]:
        """The named top-level sections as plain data (what a stage's fingerprint covers)."""
        dumped = self.model_dump(mode="json")
        return {k: dumped[k] for k in keys}


# ---------------------------------------------------------------- loading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (first on line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _loc_to_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("function-", "literal[", "list[", "dict[", "union[")):
            continue  # pydantic's union-branch tags say nothing to a user
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _message(err: dict[str, Any]) -> str:
    """Pydantic's messages, phrased as the spec's contract reads: `must be > 0`."""
    kind, ctx = err["type"], err.get("ctx") or {}
    simple = {
        "greater_than": "must be > {gt}",
        "greater_than_equal": "must be >= {ge}",
        "less_than": "must be < {lt}",
        "less_than_equal": "must be <= {le}",
        "extra_forbidden": "unknown key",
        "missing": "required key is missing",
        "int_type": "must be an integer",
        "int_parsing": "must be an integer",
        "int_from_float": "must be an integer",
        "float_type": "must be a number",
        "float_parsing": "must be a number",
        "bool_type": "must be true or false",
        "bool_parsing": "must be true or false",
        "string_type": "must be a string",
        "list_type": "must be a list",
        "dict_type": "must be a mapping",
        "model_type": "must be a mapping",
        "model_attributes_type": "must be a mapping",
        "too_short": "must have at least {min_length} item(s)",
        "string_too_short": "must have at least {min_length} character(s)",
        "string_too_long": "must have at most {max_length} characters",
        "string_pattern_mismatch": "must match {pattern} (letters, digits, '.', '_', '-')",
    }
    if kind in simple:
        return simple[kind].format(**ctx)
    if kind == "literal_error":
        return f"must be one of: {ctx.get('expected', '')}".replace("'", "")
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", err["msg"]))
    return err["msg"]


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (through Optional, Union, list and dict)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _did_you_mean(loc: tuple[Any, ...]) -> str:
    """For an unknown key: the closest key its section knows, as ` (did you mean 'x'?)`, or nothing."""
    models: list[type[BaseModel]] = [JobSpec]
    for part in loc[:-1]:
        if not isinstance(part, str):
            continue  # a list index: the same models
        models = [m for model in models if part in model.model_fields
                  for m in _models_in(model.model_fields[part].annotation)]
    keys = sorted({k for m in models for k in m.model_fields})
    typo = str(loc[-1])
    close = difflib.get_close_matches(typo, keys, n=1, cutoff=0.6) or [k for k in keys if k.startswith(typo)][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


def format_validation_error(exc: ValidationError) -> list[str]:
    lines: list[str] = []
    for err in exc.errors(include_url=False):
        line = f"{_loc_to_path(err['loc'])}: {_message(err)}"
        if err["type"] == "extra_forbidden":
            line += _did_you_mean(tuple(p for p in err["loc"] if not str(p).startswith(
                ("function-", "literal[", "list[", "dict[", "union["))))
        if line not in lines:  # a union reports one problem once per branch
            lines.append(line)
    return lines


def parse_yaml(text: str, source: str = "<spec>") -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(source, [f"(yaml) {where}{problem}"]) from None


def spec_from_data(
    data: Any, source: str = "<spec>", base_dir: str | None = None, check_files: bool = True
) -> JobSpec:
    if not isinstance(data, dict):
        raise SpecError(source, ["(top level): must be a mapping of keys (name, data, candidates, ...)"])
    try:
        return JobSpec.model_validate(
            data, context={"base_dir": base_dir or os.getcwd(), "check_files": check_files}
        )
    except ValidationError as exc:
        lines = format_validation_error(exc)
        whole = [ln for ln in lines if ln.startswith("(top level): ")]
        lines = [ln for ln in lines if ln not in whole]  # the cross checks, as one line each
        raise SpecError(source, lines + [ln for ln in cross_checks(data) if ln not in lines]) from None


def apply_overrides(data: Any, overrides: list[str], source: str) -> Any:
    """`--set key.path=value` (value read as YAML: numbers, booleans, lists) applied over the file's data."""
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or not isinstance(data, dict):
            problems.append(f"(--set {item}): expected KEY.PATH=VALUE")
            continue
        node = data
        *parents, last = key.strip().split(".")
        for part in parents:
            if not isinstance(node.get(part, {}), dict):
                problems.append(f"{'.'.join(parents)}: --set {key} goes into a value that is not a mapping")
                break
            node = node.setdefault(part, {})
        else:
            node[last] = parse_yaml(raw, f"--set {key}") if raw.strip() else raw
    if problems:
        raise SpecError(source, problems)
    return data


def load_spec(path: str | os.PathLike, base_dir: str | None = None, check_files: bool = True,
              overrides: list[str] | None = None) -> JobSpec:
    """Load and validate a job spec file, with `--set` overrides; raise SpecError listing every problem."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(source, [f"(file) cannot read: {exc}"]) from None
    data = apply_overrides(parse_yaml(text, source), overrides or [], source)
    return spec_from_data(data, source, base_dir, check_files)
