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


class Signalled(Stage):
    """Writes a partial file, then gets DAMOC_TEST_SIGNAL (a signal number, if set) from itself; with DAMOC_TEST_WRAP
    the exception it raises is swallowed and replaced, as Ray's C++ calls do (a SystemError)."""

    name, output, needs, spec_keys, needs_ray = "signalled", "signalled", ("count",), (), False

    def run(self, ctx: StageContext):
        (ctx.out / "partial.txt").write_text("half")
        try:
            if os.environ.get("DAMOC_TEST_SIGNAL"):
                os.kill(os.getpid(), int(os.environ["DAMOC_TEST_SIGNAL"]))
                time.sleep(5)
        except BaseException:
            if os.environ.get("DAMOC_TEST_WRAP"):
                raise SystemError("<cyfunction CoreWorker.wait> returned a result with an exception set") from None
            raise
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


class FillThenIdle(Stage):
    """Holds both CPUs of a 2-CPU cluster for a second, then one of them for 1.5 s more."""

    name, output, needs, spec_keys = "fill", "fill", ("count",), ()
    holds = (1.0, 2.5)  # seconds, one CPU each

    def run(self, ctx: StageContext):
        ctx.runtime  # noqa: B018
        import ray

        @ray.remote(num_cpus=1)
        def hold(seconds: float) -> None:
            time.sleep(seconds)

        ray.get([hold.remote(s) for s in self.holds])
        return {"ended_at": time.time()}


class HoldOne(FillThenIdle):
    """Holds one CPU of two for 2.5 s: never the whole cluster."""

    name, output = "one", "one"
    holds = (2.5,)


class StartsEarly(Stage):
    """Asks for one actor ahead (Stage.prepare); writes what it was given and when that actor started."""

    name, output, needs, spec_keys = "early", "early", ("fill",), ()

    def prepare(self, spec, base_dir):
        import ray

        @ray.remote(num_cpus=0)
        class Clock:
            def __init__(self):
                self.born = time.time()

            def born_at(self) -> float:
                return self.born

        return [Clock.remote()]

    def run(self, ctx: StageContext):
        began = time.time()
        ctx.runtime  # noqa: B018
        import ray

        born = [ray.get(a.born_at.remote()) for a in ctx.prepared]
        (ctx.out / "early.json").write_text(json.dumps({"prepared": len(born), "born": born, "began": began}))
        return {"prepared": len(born)}


REGISTRY = {cls.name: cls for cls in (CountRows, SquareOnRay, Flaky, Signalled, Slow, FillThenIdle, HoldOne, StartsEarly)}
