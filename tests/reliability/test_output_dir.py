"""A full or unwritable output directory fails with a clear message, and no partial output is
ever presented as complete (a stage's folder exists only with its marker)."""

from __future__ import annotations

import errno

import pytest
import stages
from conftest import spec_dict

from damoc import pipeline as pipeline_mod
from damoc.pipeline import MARKER, Pipeline, StageFailed, read_marker
from damoc.spec import spec_from_data


def make(job_dir, **overrides) -> Pipeline:
    spec = spec_from_data(spec_dict(**overrides), base_dir=str(job_dir))
    return Pipeline(spec, base_dir=job_dir, registry=stages.REGISTRY)


def disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_inside_a_stage_keeps_the_last_complete_output(job_dir, monkeypatch):
    p = make(job_dir)
    p.run(["count"])
    before = read_marker(p.run_dir, stages.CountRows)
    monkeypatch.setattr(stages.CountRows, "run", lambda self, ctx: ((ctx.out / "rows.json").write_text("{\"ro"),
                                                                  disk_full())[1])
    with pytest.raises(StageFailed, match="No space left on device"):
        make(job_dir).run(["count"])
    assert read_marker(p.run_dir, stages.CountRows) == before  # the previous complete output, untouched
    assert (p.run_dir / "count" / "rows.json").read_text() == '{"rows": 30}'
    assert [x.name for x in p.run_dir.iterdir() if x.name.startswith(".count")] == []  # no half-written folder


def test_disk_full_while_writing_the_marker_leaves_no_stage_folder(job_dir, monkeypatch):
    monkeypatch.setattr(pipeline_mod, "atomic_write_json", disk_full)
    p = make(job_dir)
    with pytest.raises(StageFailed, match=r"count.*No space left on device|No space left on device"):
        p.run(["count"])
    assert not (p.run_dir / "count").exists() and not list(p.run_dir.glob(".count*"))


def test_cli_reports_an_unwritable_output_dir_by_name(job_dir, monkeypatch, capsys):
    from conftest import write_spec

    from damoc.cli import main

    monkeypatch.chdir(job_dir)
    (job_dir / "afile").write_text("a file where the run directory should go")
    write_spec(job_dir / "job.yaml", spec_dict(output_dir="afile/run"))
    assert main(["select", "job.yaml", "--stages", "data"]) == 1
    err = capsys.readouterr().err
    assert "afile/run is not writable" in err and "Traceback" not in err
    assert not (job_dir / "afile" / MARKER).exists()
