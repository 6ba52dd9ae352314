"""TrainArgs: everything one candidate's per-worker loop needs, typed (built from the spec once, in
the stage; pickled to every worker of the candidate's trial)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from damoc.spec import JobSpec


@dataclass(frozen=True)
class LoraArgs:
    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "auto"


@dataclass(frozen=True)
class TrainArgs:
    candidate: str
    model_path: str
    train_path: str  # RUN/data/train.parquet: every worker reads its own slice (rows[rank::world])
    eval_path: str
    job: str = ""
    trust_remote_code: bool = False
    task: str = "qa"
    template: str = "auto"  # plain | chat | auto (damoc/lm/prompts.py)
    metric: str = "eval_loss"
    mode: str = "min"
    max_new_tokens: int = 32
    method: str = "lora"
    lora: LoraArgs = field(default_factory=LoraArgs)
    deepspeed: bool = True
    zero_stage: int = 2
    precision: str = "auto"
    batch_size: int = 8
    eval_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_ratio: float = 0.05
    max_steps: int = 200
    max_length: int = 512
    eval_every: int = 20
    eval_limit: int | None = 512
    seed: int = 0
    threads: int = 1
    rungs: tuple[int, ...] = ()
    barrier: str | None = None  # name of the rung barrier actor when rungs are synchronised
    local: bool = False  # Ray Train's local mode in the Tune trial's process: results go to Tune directly
    rows_dir: str | None = None  # per-row eval figures of every report (the pick's confidence), shared storage
    export_dir: str | None = None  # the LoRA adapter of the latest report, in PEFT's format
    trial_started_at: float | None = None  # wall clock when the trial's driver started (timeline)

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup_ratio * self.max_steps)

    def started(self, at: float) -> TrainArgs:
        return replace(self, trial_started_at=at)


def train_args(spec: JobSpec, name: str, model_path: str, train_path: str, eval_path: str, rungs: list[int],
               barrier: str | None, trust_remote_code: bool, steps: int) -> TrainArgs:
    """The loop's arguments for one candidate, from the job spec and the planned steps."""
    ft = spec.finetune
    lora = ft.lora
    targets: Any = lora.target_modules if isinstance(lora.target_modules, str) else tuple(lora.target_modules)
    return TrainArgs(
        candidate=name, model_path=model_path, train_path=train_path, eval_path=eval_path, job=spec.name,
        trust_remote_code=trust_remote_code, task=spec.data.task, template=ft.template, metric=spec.select.metric, mode=spec.select.mode,
        max_new_tokens=spec.select.max_new_tokens, method=ft.method,
        lora=LoraArgs(lora.r, lora.alpha, lora.dropout, targets), deepspeed=ft.deepspeed.enabled,
        zero_stage=ft.deepspeed.zero_stage, precision=ft.precision, batch_size=ft.batch_size,
        eval_batch_size=ft.batch_size, grad_accum=ft.grad_accum, lr=ft.lr, warmup_ratio=ft.warmup_ratio,
        max_steps=steps, max_length=ft.max_length, eval_every=ft.eval_every, eval_limit=ft.eval_max_rows,
        seed=spec.seed, threads=max(1, int((ft.resources_per_worker or {}).get("CPU", 1))), rungs=tuple(rungs),
        barrier=barrier, local=ft.local)
