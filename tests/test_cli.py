"""The `damoc` console script: exit codes and messages, and bad specs caught before any Ray work."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from conftest import QA_ROWS, spec_dict, write_jsonl, write_spec

from damoc.spec import load_spec
from damoc.zoo.build import PRESETS

REPO = Path(__file__).resolve().parents[1]
DAMOC = str(Path(sys.executable).parent / "damoc")


def damoc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([DAMOC, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_validate_ok(job_dir):
    write_spec(job_dir / "job.yaml", spec_dict())
    r = damoc("validate", "job.yaml", cwd=job_dir)
    assert r.returncode == 0 and "job.yaml: ok (job 't', 1 candidate(s)" in r.stdout


def test_validate_three_errors_three_lines(job_dir):
    write_spec(job_dir / "job.yaml", spec_dict(**{
        "finetune.lora.r": 0, "model.merge.method": "slerp", "data.train.path": "data/none.jsonl"}))
    r = damoc("validate", "job.yaml", cwd=job_dir)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 3, r.stderr
    assert "job.yaml: finetune.lora.r: must be > 0" in lines
    assert f"job.yaml: data.train.path: no such file: {job_dir}/data/none.jsonl" in lines
    assert any(line.startswith("job.yaml: model.merge.method: must be one of:") for line in lines)


def test_validate_names_a_truncated_candidate_and_an_unreachable_hub_one_at_once(job_dir, tiny_model):
    """A candidate whose model.safetensors was cut short (an error), and a hub candidate offline and not
    cached (a warning: the job may run where the hub is reachable): both named by their key path, in one
    pass, without loading a weight or waiting on retries."""
    import shutil

    broken = job_dir / "zoo" / "broken"
    shutil.copytree(tiny_model("llama"), broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    write_spec(job_dir / "job.yaml", spec_dict(candidates=[
        {"name": "ok", "path": "zoo/llama-s"}, {"name": "broken", "path": "zoo/broken"},
        {"name": "far", "hf": "some-org/not-cached-model"}]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(job_dir / "hf-home")}
    t0 = time.monotonic()
    r = subprocess.run([DAMOC, "validate", "job.yaml"], cwd=job_dir, capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in env.items() if k != "RAY_ADDRESS"})
    assert r.returncode == 2 and time.monotonic() - t0 < 60
    lines = r.stderr.splitlines()
    assert any(ln.startswith("job.yaml: candidates[1].path: model.safetensors is truncated: its header lists")
               for ln in lines), r.stderr
    assert any(ln.startswith("job.yaml: warning: candidates[2].hf: some-org/not-cached-model is not in the local "
                             "Hugging Face cache and HF_HUB_OFFLINE=1") for ln in lines), r.stderr  # it may run elsewhere
    assert not any("candidates[0]" in ln for ln in lines)


def test_validate_yaml_syntax_error(tmp_path):
    (tmp_path / "job.yaml").write_text("name: demo\ncandidates: [\n")
    r = damoc("validate", "job.yaml", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("job.yaml: (yaml) line 3, column 1:")


def test_select_bad_spec_fails_before_ray(job_dir):
    write_spec(job_dir / "job.yaml", spec_dict(**{"tune.scheduler": "hyperband"}))
    t0 = time.monotonic()
    r = damoc("select", "job.yaml", cwd=job_dir)
    assert r.returncode == 2 and "job.yaml: tune.scheduler: must be one of: asha or none" in r.stderr
    assert "ray" not in r.stderr.lower().replace("job.yaml", "")
    assert not (job_dir / "runs").exists()
    assert time.monotonic() - t0 < 60  # nothing was started (a generous bound, not a benchmark)


def test_select_unknown_stage(job_dir):
    write_spec(job_dir / "job.yaml", spec_dict())
    r = damoc("select", "job.yaml", "--stages", "data,pretrain", cwd=job_dir)
    assert r.returncode == 2 and "unknown stage(s) pretrain" in r.stderr


def test_demo_spec_matches_the_demo_zoo_layout():
    spec = load_spec(REPO / "jobs" / "demo.yaml", base_dir=str(REPO), check_files=False)
    assert spec.data.train.path == "zoo/demo/data/api_qa/train.jsonl"
    assert {c.name for c in spec.candidates} == {c.name for c in PRESETS["demo"]["candidates"]}
    assert all(c.path == f"zoo/demo/models/{c.name}" for c in spec.candidates)
    assert spec.model.enabled and spec.data.filter.method != "none" and spec.data.compress.enabled


def test_fields_that_match_no_column_are_named_before_any_work(job_dir):
    """`data.fields.output: answer` on a file whose answers are under `output`: validate names the field
    and the columns the file has; select refuses before starting anything."""
    write_spec(job_dir / "job.yaml", spec_dict(**{"data.fields": {"output": "answer"}}))
    r = damoc("validate", "job.yaml", cwd=job_dir)
    assert r.returncode == 2
    assert "job.yaml: data.fields.output: no column 'answer' in the first 30 rows of" in r.stderr
    assert "(they have: input, instruction, output)" in r.stderr
    r = damoc("select", "job.yaml", cwd=job_dir)
    assert r.returncode == 2 and "data.fields.output: no column 'answer'" in r.stderr
    assert not (job_dir / "runs").exists()


def test_failed_stage_keeps_its_evidence_and_traceback(job_dir):
    """Every row has an empty answer (the column exists, so validate passes): the data stage fails saying
    no row is readable and why; its quarantine is kept in RUN/data.failed; the traceback is in the run's log
    and, with -v, on the terminal."""
    write_jsonl(job_dir / "data" / "train.jsonl", [{**r, "output": ""} for r in QA_ROWS])
    write_spec(job_dir / "job.yaml", spec_dict(**{"data.filter": {"method": "none"},
                                                  "data.compress": {"enabled": False}}))
    r = damoc("select", "job.yaml", "--stages", "data", "--cpus", "2", "-v", cwd=job_dir)
    assert r.returncode == 1
    assert "no readable rows: all 30 rows of data.train were quarantined (no answer (30 rows))" in r.stderr
    assert "Traceback" in r.stderr
    run = job_dir / "runs" / "t"
    assert len((run / "data.failed" / "quarantine.jsonl").read_text().splitlines()) == 30
    assert "Traceback" in (run / "logs" / "damoc.log").read_text() and not (run / "data").exists()


def test_a_candidate_that_fails_while_the_others_go_on_exits_3(job_dir, tokenizer_dir):
    """A pipeline must tell a full result from a partial one by the exit code alone: a BLOOM candidate the
    model stage cannot compress fails, and so does a hub candidate neither cached nor reachable (at once,
    with the fix, not after the hub client's retries); the other is compressed, and the job exits 3."""
    from test_model_stage import unsupported_model

    unsupported_model(job_dir / "zoo" / "bloom-x", tokenizer_dir)
    write_spec(job_dir / "job.yaml", spec_dict(**{
        "data.filter": {"method": "none"}, "data.compress": {"enabled": False}, "data.eval": {"split_ratio": 0.1},
        "candidates": [{"name": "llama-s", "path": "zoo/llama-s"}, {"name": "bloom-x", "path": "zoo/bloom-x"},
                       {"name": "far", "hf": "some-org/not-cached-model"}],
        "model": {"calibration": {"rows": 8, "batch_size": 4}}}))
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(job_dir / "hf-home")}
    r = subprocess.run([DAMOC, "select", "job.yaml", "--stages", "data,models", "--cpus", "2"], cwd=job_dir,
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 3, r.stderr[-3000:]
    assert "2 of 3 candidate(s) failed (bloom-x, far); the output covers the others (exit 3)" in r.stderr
    models = json.loads((job_dir / "runs" / "t" / "models" / "models.json").read_text())
    far = next(c for c in models["candidates"] if c["name"] == "far")
    assert far["status"] == "failed" and "not in the local Hugging Face cache" in far["reason"] and far["seconds"] < 1


def test_running_again_keeps_what_is_current_and_fresh_recomputes(job_dir):
    write_spec(job_dir / "job.yaml", spec_dict(**{"data.filter": {"method": "none"},
                                                  "data.compress": {"enabled": False}}))
    first = damoc("select", "job.yaml", "--stages", "data", "--cpus", "2", cwd=job_dir)
    assert first.returncode == 0, first.stderr[-2000:]
    lines = (first.stdout + first.stderr).splitlines()  # a quiet terminal: DaMoC's own lines only
    assert len(lines) <= 15 and all(re.match(r"\d\d:\d\d:\d\d [IWE] damoc\.", ln) for ln in lines), lines
    assert "Ray" in (job_dir / "runs" / "t" / "logs" / "libraries.log").read_text()  # the rest is kept there
    again = damoc("select", "job.yaml", "--stages", "data", "--cpus", "2", cwd=job_dir)
    assert again.returncode == 0 and "stage data: skipped, output is current" in again.stderr
    assert "--fresh recomputes" in again.stderr  # the default is said, with the way out
    fresh = damoc("select", "job.yaml", "--stages", "data", "--cpus", "2", "--fresh", cwd=job_dir)
    assert fresh.returncode == 0 and "stage data: done in" in fresh.stderr and "output is current" not in fresh.stderr


def test_no_stray_colour_reset_after_the_last_line_on_a_terminal(job_dir):
    """Ray's CLI logger (imported by every command that starts Ray) makes colorama write ESC[0m to a
    terminal at exit; the job's last line must be its own. Run on a pseudo-terminal, as a user's shell is."""
    import pty

    write_spec(job_dir / "job.yaml", spec_dict())
    code = ("import sys, ray.autoscaler._private.cli_logger\n"
            "from damoc.cli import main\n"
            "sys.exit(main(['validate', 'job.yaml']))")
    master, slave = pty.openpty()
    try:
        r = subprocess.run([sys.executable, "-c", code], cwd=job_dir, stdout=slave, stderr=slave, timeout=120)
    finally:
        os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the terminal's other end is closed
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert r.returncode == 0 and b"job.yaml: ok" in out
    assert b"\x1b" not in out, out[-80:]


def test_set_overrides_a_spec_key_and_a_bad_one_is_named(job_dir):
    """`--set KEY.PATH=VALUE` (a YAML value) over the spec file: how a deployment points a job at its
    bucket without editing it; what it breaks is named as the file's own keys are."""
    write_spec(job_dir / "job.yaml", spec_dict())
    ok = damoc("validate", "job.yaml", "--set", "output_dir=s3://bucket/runs/t", "--set", "finetune.lora.r=4",
               cwd=job_dir)
    assert ok.returncode == 0 and "output s3://bucket/runs/t" in ok.stdout, ok.stderr
    bad = damoc("validate", "job.yaml", "--set", "finetune.lora.r=0", "--set", "nokey", "--set", "name.x=1",
                cwd=job_dir)
    assert bad.returncode == 2
    assert "(--set nokey): expected KEY.PATH=VALUE" in bad.stderr
    assert "name: --set name.x goes into a value that is not a mapping" in bad.stderr
    again = damoc("validate", "job.yaml", "--set", "finetune.lora.r=0", cwd=job_dir)
    assert again.returncode == 2 and "finetune.lora.r: must be > 0" in again.stderr
