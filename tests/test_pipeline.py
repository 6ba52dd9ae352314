"""The stage runner: order, atomic outputs, fingerprints, --resume, failures and kills."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import stages
from conftest import spec_dict, write_spec

from damoc.pipeline import (
    MARKER,
    Pipeline,
    PipelineError,
    StageFailed,
    parse_stage_list,
    read_marker,
)
from damoc.rundir import RunLocked, run_lock
from damoc.runtime import connect
from damoc.spec import spec_from_data

TESTS = Path(__file__).parent


class CountingRuntime:
    """The real runtime factory, counting how often Ray was started."""

    def __init__(self):
        self.starts = 0

    def __call__(self):
        self.starts += 1
        return connect(None, num_cpus=2)


@pytest.fixture(autouse=True)
def _no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def make_pipeline(job_dir, runtime=None, **overrides) -> Pipeline:
    spec = spec_from_data(spec_dict(**overrides), base_dir=str(job_dir))
    return Pipeline(spec, base_dir=job_dir, registry=stages.REGISTRY, runtime_factory=runtime)


def statuses(outcomes) -> dict[str, str]:
    return {o.name: o.status for o in outcomes}


def test_stages_run_in_order_write_markers_and_log(job_dir, caplog):
    caplog.set_level(logging.INFO, logger="damoc")
    rt = CountingRuntime()
    p = make_pipeline(job_dir, rt)
    out = p.run(["square", "count"])  # asked out of order, run in pipeline order
    assert [o.name for o in out] == ["count", "square"] and statuses(out) == {"count": "ran", "square": "ran"}
    assert json.loads((p.run_dir / "square" / "sum.json").read_text())["sum"] == sum(i * i for i in range(30))
    marker = read_marker(p.run_dir, stages.SquareOnRay)
    assert marker["counts"] == {"tasks": 30, "sum": 8555} and marker["fingerprint"] == out[1].fingerprint
    assert (p.run_dir / "spec.yaml").is_file()
    assert rt.starts == 1
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("stage count: done in") and "rows=30" in line for line in lines)
    assert any(line.startswith("stage square: done in") and "tasks=30" in line for line in lines)


def test_resume_skips_unchanged_and_starts_no_ray(job_dir):
    make_pipeline(job_dir, CountingRuntime()).run()
    rt = CountingRuntime()
    out = make_pipeline(job_dir, rt).run(resume=True)
    assert set(statuses(out).values()) == {"skipped"}
    assert rt.starts == 0


def test_changed_input_file_reruns_it_and_downstream(job_dir):
    p = make_pipeline(job_dir, CountingRuntime())
    p.run(["count", "square"])
    with open(job_dir / "data" / "train.jsonl", "a") as fh:
        fh.write('{"instruction": "q", "output": "a"}\n')
    out = make_pipeline(job_dir, CountingRuntime()).run(["count", "square"], resume=True)
    assert statuses(out) == {"count": "ran", "square": "ran"}
    assert json.loads((p.run_dir / "count" / "rows.json").read_text())["rows"] == 31


def test_changed_spec_section_reruns_only_its_readers(job_dir):
    make_pipeline(job_dir, CountingRuntime()).run(["count", "square"])
    out = make_pipeline(job_dir, CountingRuntime(), **{"finetune.lr": 1e-3}).run(["count", "square"], resume=True)
    assert statuses(out) == {"count": "skipped", "square": "ran"}
    out = make_pipeline(job_dir, CountingRuntime(), **{"finetune.lr": 1e-3, "select.metric": "rouge_l"}).run(
        ["count", "square"], resume=True)
    assert statuses(out) == {"count": "skipped", "square": "skipped"}  # neither reads `select`
    out = make_pipeline(job_dir, CountingRuntime(), **{"finetune.lr": 1e-3, "seed": 7}).run(
        ["count", "square"], resume=True)
    assert statuses(out) == {"count": "ran", "square": "ran"}  # the seed touches every stage


def test_without_resume_every_selected_stage_reruns(job_dir):
    make_pipeline(job_dir).run(["count"])
    first = read_marker(make_pipeline(job_dir).run_dir, stages.CountRows)["finished_at"]
    out = make_pipeline(job_dir).run(["count"])
    assert statuses(out) == {"count": "ran"} and read_marker(make_pipeline(job_dir).run_dir, stages.CountRows)
    assert first  # the marker was rewritten by the second run (same fingerprint)


def test_failed_stage_keeps_previous_output_and_leaves_no_partial(job_dir, monkeypatch):
    p = make_pipeline(job_dir)
    p.run(["count", "flaky"])
    before = read_marker(p.run_dir, stages.Flaky)
    monkeypatch.setenv("DAMOC_TEST_FAIL", "1")
    with pytest.raises(StageFailed, match="stage flaky failed after .*injected failure"):
        make_pipeline(job_dir).run(["flaky"])
    assert read_marker(p.run_dir, stages.Flaky) == before
    assert (p.run_dir / "flaky" / "done.txt").read_text() == "whole"
    assert not [x for x in p.run_dir.iterdir() if x.name.startswith(".flaky")]
    assert (p.run_dir / "flaky.failed" / "partial.txt").read_text() == "half"  # the evidence, kept apart
    assert not (p.run_dir / "flaky.failed" / "_stage.json").exists()
    monkeypatch.delenv("DAMOC_TEST_FAIL")
    make_pipeline(job_dir).run(["flaky"])  # a later success supersedes it
    assert not (p.run_dir / "flaky.failed").exists()


@pytest.mark.parametrize("signum, wrapped", [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGTERM, True)])
def test_a_stop_signal_is_an_interruption_never_a_success_or_a_failure(job_dir, monkeypatch, signum, wrapped):
    """SIGINT/SIGTERM inside a stage: Interrupted with the shell's exit code, the stage neither marked done
    nor kept as failed, even when a library turned the signal's exception into its own error."""
    from damoc.interrupt import Interrupted, interruptible

    monkeypatch.setenv("DAMOC_TEST_SIGNAL", str(int(signum)))
    if wrapped:
        monkeypatch.setenv("DAMOC_TEST_WRAP", "1")
    p = make_pipeline(job_dir)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(Interrupted) as stop, interruptible():
        p.run(["count", "signalled"])
    assert stop.value.exit_code == 128 + signum
    assert read_marker(p.run_dir, stages.CountRows) is not None  # the stage before it is done
    assert not (p.run_dir / "signalled").exists() and not (p.run_dir / "signalled.failed").exists()
    assert {s: signal.getsignal(s) for s in before} == before  # the handlers are put back


def test_failed_first_run_leaves_nothing_that_looks_complete(job_dir, monkeypatch):
    monkeypatch.setenv("DAMOC_TEST_FAIL", "1")
    p = make_pipeline(job_dir)
    with pytest.raises(StageFailed):
        p.run(["count", "flaky"])
    assert read_marker(p.run_dir, stages.CountRows) is not None  # the stage before it finished
    assert not (p.run_dir / "flaky").exists()
    monkeypatch.delenv("DAMOC_TEST_FAIL")
    assert statuses(make_pipeline(job_dir).run(["count", "flaky"], resume=True)) == {
        "count": "skipped", "flaky": "ran"}


def test_killed_stage_is_not_taken_as_complete(job_dir, tmp_path):
    spec_path = write_spec(job_dir / "job.yaml", spec_dict())
    flag = tmp_path / "started"
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); import stages; "
        "from damoc.pipeline import Pipeline; from damoc.spec import load_spec; "
        f"spec = load_spec({str(spec_path)!r}, base_dir={str(job_dir)!r}); "
        f"Pipeline(spec, base_dir={str(job_dir)!r}, registry=stages.REGISTRY).run(['count', 'slow'])"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, DAMOC_TEST_HANG=str(flag)))
    try:
        for _ in range(600):
            if flag.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert flag.exists(), "the slow stage never started"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    run_dir = job_dir / "runs" / "t"
    assert read_marker(run_dir, stages.Slow) is None and not (run_dir / "slow").exists()
    assert [x.name for x in run_dir.iterdir() if x.name.startswith(".slow")]  # the partial build
    out = make_pipeline(job_dir).run(["count", "slow"], resume=True)
    assert statuses(out) == {"count": "skipped", "slow": "ran"}
    assert (run_dir / "slow" / "done.txt").read_text() == "whole" and (run_dir / "slow" / MARKER).is_file()
    assert not [x for x in run_dir.iterdir() if x.name.startswith(".slow")]  # leftovers cleaned


def test_missing_upstream_is_a_clear_error(job_dir):
    with pytest.raises(PipelineError, match="stage square needs the output of stage count .*add 'count'"):
        make_pipeline(job_dir, CountingRuntime()).run(["square"])


def test_stale_upstream_is_warned_about(job_dir, caplog):
    make_pipeline(job_dir).run(["count", "flaky"])
    with open(job_dir / "data" / "train.jsonl", "a") as fh:
        fh.write("{}\n")
    caplog.set_level(logging.WARNING, logger="damoc")
    make_pipeline(job_dir).run(["flaky"])
    assert any("output of count is stale" in r.getMessage() for r in caplog.records)


def test_one_run_per_directory(job_dir):
    p = make_pipeline(job_dir)
    with run_lock(p.run_dir), pytest.raises(RunLocked, match="in use by another damoc process"):
        p.run(["count"])


def test_unwritable_run_dir_fails_naming_it(job_dir):
    (job_dir / "afile").write_text("x")
    p = make_pipeline(job_dir, output_dir="afile/run")
    with pytest.raises(PermissionError, match="afile/run is not writable"):
        p.run(["count"])


def test_the_next_stage_starts_its_actors_once_this_one_leaves_a_cpu_idle(job_dir):
    """A stage's `prepare` runs while the stage before it runs, once that one has held every CPU and then
    left one idle; its actors reach the stage as ctx.prepared, already started. A stage that never held
    every CPU gets nothing started early."""
    pipeline = make_pipeline(job_dir, CountingRuntime())
    pipeline.order = ("count", "fill", "early")
    pipeline.run(["count", "fill", "early"])
    early = json.loads((pipeline.run_dir / "early" / "early.json").read_text())
    fill_ended = json.loads((pipeline.run_dir / "fill" / MARKER).read_text())["counts"]["ended_at"]
    assert early["prepared"] == 1 and early["born"][0] < fill_ended < early["began"]

    pipeline.order = ("count", "one", "early")
    stages.StartsEarly.needs = ("one",)
    try:
        pipeline.run(["count", "one", "early"])
    finally:
        stages.StartsEarly.needs = ("fill",)
    assert json.loads((pipeline.run_dir / "early" / "early.json").read_text())["prepared"] == 0


def test_stage_list_parsing():
    assert parse_stage_list(None) == ["data", "models", "finetune", "report"]
    assert parse_stage_list("report, data") == ["data", "report"]
    with pytest.raises(PipelineError, match="unknown stage.*train"):
        parse_stage_list("data,train")
