"""Small real stages for the runner's tests: they read the run directory and write real files."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from damoc.pipeline import Stage, StageContext


class CountRows(Stage):
    """Reads the spec's training file, writes its row count."""

    name, output, spec_keys, needs_ray = "count", "count", ("data",), False

    def external_inputs(self, spec):
        return [spec.data.train.path]

    def run(self, ctx: StageContext):
        lines = Path(ctx.resolve(ctx.spec.data.train.path)).read_text().splitlines()
        (ctx.out / "rows.json").write_text(json.dumps({"rows": len(lines)}))
        return {"rows": len(lines)}


class SquareOnRay(Stage):
    """Reads the count stage's output, squares 0..n-1 as real Ray tasks, writes the sum."""

    name, output, needs, spec_keys = "square", "square", ("count",), ("finetune",)

    def run(self, ctx: StageContext):
        n = json.loads((ctx.input("count") / "rows.json").read_text())["rows"]
        ctx.runtime  # started on first use
        import ray

        @ray.remote(num_cpus=0.5)
        def square(i: int) -> int:
            return i * i

        total = sum(ray.get([square.remote(i) for i in range(n)]))
        (ctx.out / "sum.json").write_text(json.dumps({"sum": total, "lr": ctx.spec.finetune.lr}))
        return {"tasks": n, "sum": total}


class Flaky(Stage):
    """Writes a partial file, then fails when DAMOC_TEST_FAIL is set."""

    name, output, needs, spec_keys, needs_ray = "flaky", "flaky", ("count",), (), False

    def run(self, ctx: StageContext):
        (ctx.out / "partial.txt").write_text("half")
        if os.environ.get("DAMOC_TEST_FAIL"):
            raise ValueError("injected failure")
        (ctx.out / "done.txt").write_text("whole")
        return {"files": 2}


class Slow(Stage):
    """Writes a partial file, signals it started, then hangs while DAMOC_TEST_HANG is set."""

    name, output, needs, spec_keys, needs_ray = "slow", "slow", ("count",), (), False

    def run(self, ctx: StageContext):
        (ctx.out / "partial.txt").write_text("half")
        flag = os.environ.get("DAMOC_TEST_HANG")
        if flag:
            Path(flag).write_text(str(os.getpid()))
            time.sleep(600)
        (ctx.out / "done.txt").write_text("whole")
        return {"files": 2}


REGISTRY = {cls.name: cls for cls in (CountRows, SquareOnRay, Flaky, Slow)}
