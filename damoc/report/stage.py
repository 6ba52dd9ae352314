"""The report stage: ranking.json, report.md / report.html and plots under RUN/report/."""

from __future__ import annotations

from typing import Any

from damoc.pipeline import Stage, StageContext, register_stage
from damoc.report.build import write_report


@register_stage
class ReportStage(Stage):
    name = "report"
    output = "report"
    needs = ("finetune",)
    spec_keys = ("select",)
    version = "1"
    needs_ray = False

    def run(self, ctx: StageContext) -> dict[str, Any]:
        ranking = write_report(ctx.run_dir, ctx.out)
        ranked = [c for c in ranking["candidates"] if c["rank"] is not None]
        return {"ranked": len(ranked), "best": ranked[0]["name"] if ranked else None,
                "worker_seconds": ranking["cost"]["worker_seconds"]}
