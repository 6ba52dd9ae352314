"""A run directory on object storage, against a real S3 server on 127.0.0.1 (moto's server mode), with its
credentials and endpoint from the environment: stage markers written last, stale keys removed, the run
lock as a lease, worker reads through a node-local cache keyed by content, and a whole job on s3://."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import stages
from conftest import QA_ROWS, spec_dict, write_jsonl, write_spec
from s3server import s3_server

from damoc import store
from damoc.pipeline import MARKER, Pipeline, read_marker
from damoc.rundir import RunLocked
from damoc.spec import spec_from_data

BUCKET = "damoc-test"


@pytest.fixture(scope="module")
def s3():
    with s3_server(BUCKET) as env:
        yield env


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """This 'node's' cache (the driver's mirror and the worker cache live under it)."""
    monkeypatch.setenv("DAMOC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def uri(test: str) -> str:
    return f"s3://{BUCKET}/{test}-{time.time_ns()}"


def folder(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / MARKER).write_text(json.dumps({"stage": "x", "fingerprint": "f1", "finished_at": "t"}))
    return root


def test_a_stage_is_published_files_first_marker_last_and_stale_keys_go(s3, tmp_path):
    run = store.RemoteRun(uri("publish"))
    marker = run.publish("models", folder(tmp_path / "a", {"m/config.json": "{}", "m/w.safetensors": "W1",
                                                          "old/x.json": "1"}), {})
    assert set(marker["files"]) == {"m/config.json", "m/w.safetensors", "old/x.json"}
    assert marker["files"]["m/w.safetensors"]["size"] == 2 and len(marker["files"]["m/w.safetensors"]["sha256"]) == 64
    assert run.marker("models")["fingerprint"] == "f1"
    run.begin("models")  # a rerun starts: from now on the stage is not done, anywhere
    assert run.marker("models") is None
    run.publish("models", folder(tmp_path / "b", {"m/config.json": "{}", "m/w.safetensors": "W2"}),
                {"n/w.safetensors": {"size": 1, "sha256": "0" * 64}})  # a worker's upload, listed not sent
    assert store.remote_keys(f"{run.uri}/models") == [MARKER, "m/config.json", "m/w.safetensors"]
    assert set(run.marker("models")["files"]) == {"m/config.json", "m/w.safetensors", "n/w.safetensors"}


def test_a_worker_fetches_once_per_content_and_never_mixes_generations(s3, tmp_path, cache, monkeypatch):
    run = store.RemoteRun(uri("localize"))
    run.publish("models", folder(tmp_path / "a", {"m/config.json": "{}", "m/w.safetensors": "W1"}), {})
    local = Path(store.localize(f"{run.uri}/models/m"))
    assert local.is_relative_to(cache / "objects") and (local / "w.safetensors").read_text() == "W1"
    assert store.localize(f"{run.uri}/models/m/") == str(local)  # cached: the same folder, no download
    other = store.RemoteRun(uri("localize-same-content"))  # another run, the same files: the same copy
    other.publish("models", folder(tmp_path / "b", {"m/config.json": "{}", "m/w.safetensors": "W1"}), {})
    assert store.localize(f"{other.uri}/models/m") == str(local)
    store.put_bytes(f"{run.uri}/models/m/w.safetensors", b"W9")  # rewritten behind its marker's back
    store.put_bytes(f"{run.uri}/models/m/config.json", b'{"x": 1}')
    monkeypatch.setenv("DAMOC_CACHE", str(tmp_path / "another-node"))
    with pytest.raises(OSError, match="does not match its stage marker"):
        store.localize(f"{run.uri}/models/m")
    assert store.localize("relative/local/path") == "relative/local/path"
    with pytest.raises(FileNotFoundError, match="not inside a finished stage"):
        store.localize(f"{uri('nowhere')}/models/m")


def test_the_run_lock_is_a_lease_one_holder_and_a_dead_holders_lease_expires(s3):
    where = uri("lease")
    first = store.Lease(where, ttl_s=2.0, settle_s=0.1)
    with first.held():
        with pytest.raises(RunLocked, match=f"is held by {first.owner}"):
            store.Lease(where, ttl_s=2.0, settle_s=0.1).acquire()
        time.sleep(2.5)  # renewed every ttl/4: still held
        with pytest.raises(RunLocked):
            store.Lease(where, ttl_s=2.0, settle_s=0.1).acquire()
    assert store.get_json(f"{where}/.lock.json") is None  # released
    store.put_bytes(f"{where}/.lock.json", json.dumps({"owner": "dead:1:x", "heartbeat": time.time() - 10}).encode())
    with store.Lease(where, ttl_s=2.0, settle_s=0.1).held() as lease:  # the dead holder's lease ran out
        assert store.get_json(f"{where}/.lock.json")["owner"] == lease.owner


def test_unreachable_storage_is_named_with_where_credentials_come_from(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(PermissionError, match=r"cannot be read or written.*AWS_ACCESS_KEY_ID"):
        store.Lease(uri("nowhere"), settle_s=0).acquire()


def make_pipeline(job_dir: Path, output_dir: str) -> Pipeline:
    spec = spec_from_data(spec_dict(output_dir=output_dir), base_dir=str(job_dir))
    return Pipeline(spec, base_dir=job_dir, registry=stages.REGISTRY)


def test_stages_on_s3_resume_from_any_driver_and_an_interrupted_one_is_not_done(s3, job_dir, tmp_path,
                                                                              monkeypatch):
    from damoc.interrupt import Interrupted, interruptible

    where = uri("pipeline")
    monkeypatch.setenv("DAMOC_CACHE", str(tmp_path / "driver-a"))
    p = make_pipeline(job_dir, where)
    assert [o.status for o in p.run(["count", "flaky"], resume=True)] == ["ran", "ran"]
    assert p.run_dir.is_relative_to(tmp_path / "driver-a")  # the stages worked in a mirror
    assert store.RemoteRun(where).marker("flaky")["files"].keys() == {"partial.txt", "done.txt"}
    assert store.get_bytes(f"{where}/spec.yaml")

    monkeypatch.setenv("DAMOC_CACHE", str(tmp_path / "driver-b"))  # another machine: an empty mirror
    q = make_pipeline(job_dir, where)
    assert [o.status for o in q.run(["count", "flaky"], resume=True)] == ["skipped", "skipped"]
    assert (q.run_dir / "flaky" / "done.txt").read_text() == "whole"

    monkeypatch.setenv("DAMOC_TEST_SIGNAL", str(int(signal.SIGTERM)))
    with pytest.raises(Interrupted), interruptible():
        make_pipeline(job_dir, where).run(["count", "signalled"], resume=True)
    assert store.RemoteRun(where).marker("signalled") is None  # nothing of it reads as done
    assert store.remote_keys(f"{where}/signalled") == []
    monkeypatch.delenv("DAMOC_TEST_SIGNAL")
    monkeypatch.setenv("DAMOC_TEST_FAIL", "1")  # a stage failing before it wrote to the bucket keeps its output
    with pytest.raises(Exception, match="injected failure"):
        make_pipeline(job_dir, where).run(["count", "flaky"], resume=False)
    assert store.RemoteRun(where).marker("flaky") is not None
    assert store.get_bytes(f"{where}/flaky.failed/partial.txt") == b"half"  # its evidence, beside it
    monkeypatch.delenv("DAMOC_TEST_FAIL")
    store.RemoteRun(where).begin("flaky")  # a driver that died while its workers wrote left it unmarked
    monkeypatch.setenv("DAMOC_CACHE", str(tmp_path / "driver-a"))  # whose mirror still says done
    again = make_pipeline(job_dir, where)
    assert [o.status for o in again.run(["count", "flaky", "signalled"], resume=True)] == ["skipped", "ran", "ran"]
    assert read_marker(again.run_dir, stages.Signalled) is not None


@pytest.mark.slow
def test_a_job_on_s3_uploads_models_once_trials_read_them_from_the_node_cache(s3, tmp_path, tiny_model):
    """`damoc select` with output_dir s3://...: the model stage's actors upload their folders, the trials
    fetch them into the node's cache, the mirror holds no weights; a second driver with an empty mirror
    finds every stage done; a driver holding the run's lease keeps a second one out."""
    root = tmp_path / "job"
    write_jsonl(root / "data" / "train.jsonl", QA_ROWS * 2)
    (root / "zoo").mkdir()
    os.symlink(tiny_model("llama", layers=4), root / "zoo" / "llama-s")
    os.symlink(tiny_model("gpt2", layers=4), root / "zoo" / "gpt2-s")
    where = uri("job")
    write_spec(root / "job.yaml", spec_dict(**{
        "output_dir": where, "data.eval": {"split_ratio": 0.2}, "data.filter": {"method": "none"},
        "data.compress": {"enabled": False}, "candidates": [{"name": n, "path": f"zoo/{n}"} for n in ("llama-s", "gpt2-s")],
        "model": {"calibration": {"rows": 8, "batch_size": 4}},
        "finetune": {"num_workers": 1, "max_steps": 8, "eval_every": 4, "batch_size": 4}}))

    def select(cache: str) -> subprocess.CompletedProcess:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "DAMOC_CACHE": str(tmp_path / cache)}
        return subprocess.run([sys.executable, "-m", "damoc", "select", "job.yaml", "--cpus", "2"], cwd=root, env=env,
                              capture_output=True, text=True, timeout=600)

    first = select("node")
    assert first.returncode == 0, first.stderr[-4000:]
    run = store.RemoteRun(where)
    for stage in ("data", "models", "finetune", "report"):
        assert run.marker(stage) is not None, stage
    models = run.marker("models")["files"]
    assert {"llama-s/model.safetensors", "gpt2-s/model.safetensors", "models.json"} <= set(models)
    mirrors = list((tmp_path / "node" / "runs").iterdir())
    assert len(mirrors) == 1 and (mirrors[0] / "models" / "llama-s" / "config.json").exists()
    assert not list(mirrors[0].glob("models/*/*.safetensors"))  # the weights were never on the driver
    cached = [p for p in (tmp_path / "node" / "objects").iterdir() if not p.name.startswith(".")]
    assert {c.name for p in cached for c in p.iterdir()} == {"llama-s", "gpt2-s", "train.parquet", "eval.parquet"}
    ranking = json.loads(store.get_bytes(f"{where}/report/ranking.json"))
    assert {c["name"] for c in ranking["candidates"]} == {"llama-s", "gpt2-s"}

    second = select("other-node")  # a new driver, nothing local: the bucket says every stage is done
    assert second.returncode == 0, second.stderr[-4000:]
    assert "0 stage(s) ran, 4 skipped" in second.stderr and "stage finetune: fetched from" in second.stderr
    assert ranking["candidates"][0]["name"] in second.stdout.split("\n", 2)[1]

    with store.Lease(where, settle_s=0).held() as lease:  # another driver holds the run
        held = select("third")
    assert held.returncode == 1 and f"is held by {lease.owner}" in held.stderr
