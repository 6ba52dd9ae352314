"""Injected faults: the driver killed mid-run and resumed, a model-stage actor killed and
retried. Nothing finished is redone, nothing half-written is taken as done, and a planted
secret never reaches a log, a report or any file of the run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from conftest import QA_ROWS, spec_dict, write_jsonl, write_spec
from trainkit import hopeless_copy

from damoc.pipeline import MARKER, Pipeline
from damoc.runtime import connect
from damoc.spec import spec_from_data

import damoc.data.stage  # noqa: F401  (registers the stages)
import damoc.model.stage  # noqa: F401

PLANTED = "hf_PLANTEDsecretTOKEN0123456789abcdef"


@pytest.fixture(autouse=True)
def _no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def kill_tree(proc: psutil.Process) -> None:
    """SIGKILL a process and every descendant at once, as a node loss would."""
    procs = [proc, *proc.children(recursive=True)]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


@pytest.mark.slow
def test_driver_killed_mid_run_then_resume_redoes_nothing_finished(job_dir, tiny_model, tmp_path):
    write_jsonl(job_dir / "data" / "train.jsonl", QA_ROWS * 2)
    os.symlink(tiny_model("gpt2"), job_dir / "zoo" / "gpt2-s")
    spec = write_spec(job_dir / "job.yaml", spec_dict(**{
        "data.eval": {"split_ratio": 0.2}, "data.filter": {"method": "none"}, "data.compress": {"enabled": False},
        "candidates": [{"name": "llama-s", "path": "zoo/llama-s"}, {"name": "gpt2-s", "path": "zoo/gpt2-s"}],
        "finetune": {"num_workers": 1, "max_steps": 6, "eval_every": 3, "batch_size": 4,
                     "deepspeed": {"enabled": False}},
        "tune": {"grace_period": 3}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HF_TOKEN"] = PLANTED
    cmd = [sys.executable, "-m", "damoc", "select", str(spec)]
    run = job_dir / "runs" / "t"
    first = subprocess.Popen(cmd, cwd=job_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while not (run / "data" / MARKER).exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.2)
    time.sleep(2)  # the model stage is under way: its folder is temporary, without a marker
    assert first.poll() is None, "the run ended before it could be killed"
    data_marker = json.loads((run / "data" / MARKER).read_text())
    kill_tree(psutil.Process(first.pid))
    killed_log = first.stdout.read()
    assert not (run / "report").exists() and not (run / "finetune" / MARKER).exists()

    resumed = subprocess.run([*cmd, "--resume"], cwd=job_dir, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage data: skipped, output is current" in resumed.stderr
    assert json.loads((run / "data" / MARKER).read_text()) == data_marker  # not redone: same fingerprint, same time
    for stage in ("models", "finetune", "report"):
        assert json.loads((run / stage / MARKER).read_text())["stage"] == stage
    ranking = json.loads((run / "report" / "ranking.json").read_text())
    assert {c["name"] for c in ranking["candidates"]} == {"llama-s", "gpt2-s"}
    assert not [p for p in run.rglob("*") if p.name.startswith(".") and ".tmp" in p.name]  # no leftovers

    # The planted token: in the environment of every process of both runs, in no file and no output.
    leaked = [p for p in run.rglob("*") if p.is_file() and PLANTED.encode() in p.read_bytes()]
    assert leaked == [] and PLANTED not in killed_log + resumed.stdout + resumed.stderr


@pytest.mark.slow
def test_model_stage_actor_killed_is_retried(job_dir, tiny_model):
    spec = spec_from_data(spec_dict(**{
        "data.filter": {"method": "none"}, "data.compress": {"enabled": False}, "data.eval": {"split_ratio": 0.1},
        "candidates": [{"name": "llama-s", "path": str(tiny_model("llama", layers=4))},
                       {"name": "neox-s", "path": str(tiny_model("gpt_neox", layers=4))}],
        "model": {"prune_ratio": 0.5, "calibration": {"rows": 16, "batch_size": 4}}}), base_dir=str(job_dir))
    killed: list[int] = []

    def assassin(stop: threading.Event) -> None:  # SIGKILL the first compressor actor process seen
        while not stop.is_set() and not killed:
            for p in psutil.process_iter(["cmdline"]):
                if any("CandidateCompressor" in a for a in p.info["cmdline"] or []):
                    p.kill()
                    killed.append(p.pid)
                    return
            time.sleep(0.02)

    stop = threading.Event()
    t = threading.Thread(target=assassin, args=(stop,), daemon=True)
    pipeline = Pipeline(spec, base_dir=job_dir, runtime_factory=lambda: connect(None, num_cpus=2))
    pipeline.run(["data"])
    t.start()
    try:
        pipeline.run(["models"])
    finally:
        stop.set()
        t.join()
    assert killed, "no compressor actor was seen to kill"
    index = json.loads((pipeline.run_dir / "models" / "models.json").read_text())
    assert [e["status"] for e in index["candidates"]] == ["compressed", "compressed"]


@pytest.mark.slow
def test_driver_killed_during_finetune_resumes_trials_where_they_were(job_dir, tiny_model, tmp_path):
    """Three trials at once; ASHA stops two (steps 2 and 4), the winner trains on (tune.finish_winner). The
    driver's whole process tree is killed while the winner is mid-way; `damoc select` again resumes the
    sweep: the stopped trials are not run again, the winner continues from its checkpoint, the ranking is
    the uninterrupted run's and the cost adds both attempts. The sweep's state is on finetune.storage_path
    (a shared volume on a cluster); a second run directory of the same job never takes it for its own."""
    write_jsonl(job_dir / "data" / "train.jsonl", QA_ROWS * 3)
    good = tiny_model("llama", hidden=32, layers=2)
    hopeless_copy(good, job_dir / "zoo" / "bad")
    os.symlink(tiny_model("gpt2", hidden=32, layers=2), job_dir / "zoo" / "gpt2-s")
    spec = spec_dict(**{
        "data.eval": {"split_ratio": 0.2}, "data.filter": {"method": "none"}, "data.compress": {"enabled": False},
        "candidates": [{"name": "llama-s", "path": "zoo/llama-s"}, {"name": "gpt2-s", "path": "zoo/gpt2-s"},
                       {"name": "bad", "path": "zoo/bad"}],
        "model": {"enabled": False},
        "finetune": {"num_workers": 1, "max_steps": 120, "eval_every": 2, "batch_size": 4, "lr": 5e-3,
                     "storage_path": str(job_dir / "shared")},  # as on a cluster: a shared volume
        "tune": {"grace_period": 2, "reduction_factor": 2, "finish_winner": True}})
    write_spec(job_dir / "job.yaml", spec)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    cmd = [sys.executable, "-m", "damoc", "select", "job.yaml", "--cpus", "4"]
    first = subprocess.Popen(cmd, cwd=job_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(first.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 600

    def wait_for(done) -> None:
        while not done() and time.monotonic() < deadline:
            assert first.poll() is None, "".join(lines)[-3000:]
            time.sleep(0.1)

    wait_for(lambda: any("finetune: decided at step" in ln for ln in lines))
    wait_for(lambda: any(re.search(r"llama-s +step +(8|[1-9]\d)\b", ln) for ln in lines))  # past the rung
    seen = time.time()
    states = lambda: list((job_dir / "shared").glob("t-*/tune/experiment_state*.json"))  # noqa: E731
    wait_for(lambda: any(p.stat().st_mtime > seen for p in states()))  # Tune saved its state since then
    assert first.poll() is None, "the run ended before it could be killed"
    kill_tree(psutil.Process(first.pid))
    run = job_dir / "runs" / "t"
    assert not (run / "finetune" / MARKER).exists()

    resumed = subprocess.run(cmd, cwd=job_dir, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming the sweep" in resumed.stderr
    results = json.loads((run / "finetune" / "results.json").read_text())
    by = {e["name"]: e for e in results["candidates"]}
    assert results["resumed"] == 1 and results["decided_at"] == 4
    for name in ("bad", "gpt2-s"):  # stopped before the interruption: kept as they were, not run again
        assert by[name]["status"] == "stopped_early" and by[name]["attempts"] == 1
    assert sorted(by[n]["steps"] for n in ("bad", "gpt2-s")) == [2, 4]  # one stopped at each rung
    win = by["llama-s"]
    assert win["status"] == "finished" and win["steps"] == 120 and win["attempts"] == 2
    assert win["start_step"] > 4  # continued from its checkpoint, not from step 0
    assert win["earlier_seconds"] > 0 and win["worker_seconds"] > win["earlier_seconds"]  # both attempts billed

    straight = job_dir / "straight.yaml"
    write_spec(straight, {**spec, "output_dir": "runs/straight"})
    done = subprocess.run([sys.executable, "-m", "damoc", "select", "straight.yaml", "--cpus", "4"], cwd=job_dir,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    order = lambda d: [(c["name"], c["status"], c["steps"]) for c in  # noqa: E731
                       json.loads((d / "report" / "ranking.json").read_text())["candidates"]]
    assert order(run) == order(job_dir / "runs" / "straight")
    report = (run / "report" / "report.md").read_text()
    assert "resumed" in report
