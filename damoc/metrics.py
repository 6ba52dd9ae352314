"""DaMoC's own metrics on Ray's metrics endpoint (`ray.util.metrics`; Prometheus format).

Names start with `damoc_` (Ray's exporter adds its `ray_` prefix: `ray_damoc_rows_read`). Every
series carries the job name (`job`), so a dashboard can follow several runs at once. Recording
is a no-op in a process that is not connected to Ray (a report rebuilt offline, a unit test),
and a metrics failure never fails the job.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("damoc.metrics")

# name -> (kind, description, tag keys); the Grafana dashboard in k8s/base/monitoring reads these names.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "damoc_rows_read": ("Gauge", "Rows read by the data stage", ("job",)),
    "damoc_rows_kept": ("Gauge", "Rows kept for training", ("job",)),
    "damoc_rows_quarantined": ("Gauge", "Rows that could not be read, quarantined with a reason", ("job",)),
    "damoc_rows_dropped": ("Gauge", "Rows dropped, by reason", ("job", "reason")),
    "damoc_prompt_tokens": ("Gauge", "Prompt tokens of the kept rows before/after compression", ("job", "when")),
    "damoc_layers_removed": ("Gauge", "Decoder layers removed by the model stage", ("job", "candidate")),
    "damoc_candidate_params": ("Gauge", "Parameters per candidate before/after compression",
                               ("job", "candidate", "when")),
    "damoc_train_loss": ("Gauge", "Training loss at the last report", ("job", "candidate")),
    "damoc_eval_metric": ("Gauge", "Evaluation metric at the last report", ("job", "candidate", "metric")),
    "damoc_train_steps": ("Gauge", "Optimizer steps done", ("job", "candidate")),
    "damoc_trials": ("Gauge", "Fine-tuning trials by outcome (finished, decided, stopped_early, failed)",
                     ("job", "status")),
    "damoc_stage_seconds": ("Gauge", "Seconds a stage took", ("job", "stage")),
}
_live: dict[str, Any] = {}


def _metric(name: str):
    if name not in _live:
        from ray.util import metrics

        kind, description, tags = METRICS[name]
        _live[name] = getattr(metrics, kind)(name, description=description, tag_keys=tags)
    return _live[name]


def set_gauge(name: str, value: float, **tags: str) -> None:
    """Set one series; silently nothing when Ray is not connected."""
    try:
        import ray

        if not ray.is_initialized() or value is None:
            return
        _metric(name).set(float(value), tags={k: str(v) for k, v in tags.items()})
    except Exception as exc:  # noqa: BLE001 - observability must never break the job
        log.debug("metric %s not recorded: %s", name, exc)


def record_data(job: str, manifest: dict[str, Any]) -> None:
    set_gauge("damoc_rows_read", manifest["input"], job=job)
    set_gauge("damoc_rows_kept", manifest["kept"], job=job)
    set_gauge("damoc_rows_quarantined", manifest["quarantined"], job=job)
    for reason, n in manifest["dropped"].items():
        set_gauge("damoc_rows_dropped", n, job=job, reason=reason)
    set_gauge("damoc_prompt_tokens", manifest["tokens_before"], job=job, when="before")
    set_gauge("damoc_prompt_tokens", manifest["tokens_after"], job=job, when="after")


def record_candidate(job: str, name: str, compression: dict[str, Any]) -> None:
    set_gauge("damoc_layers_removed", len(compression.get("removed", [])), job=job, candidate=name)
    for when in ("before", "after"):
        set_gauge("damoc_candidate_params", compression.get(f"params_{when}"), job=job, candidate=name, when=when)


def record_report(job: str, candidate: str, metric: str, values: dict[str, Any]) -> None:
    set_gauge("damoc_train_loss", values.get("train_loss"), job=job, candidate=candidate)
    set_gauge("damoc_eval_metric", values.get(metric), job=job, candidate=candidate, metric=metric)
    set_gauge("damoc_train_steps", values.get("step"), job=job, candidate=candidate)


def record_trials(job: str, counts: dict[str, int]) -> None:
    for status, n in counts.items():
        set_gauge("damoc_trials", n, job=job, status=status)


def record_stage(job: str, stage: str, seconds: float) -> None:
    set_gauge("damoc_stage_seconds", seconds, job=job, stage=stage)
