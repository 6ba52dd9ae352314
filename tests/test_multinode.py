"""A real multi-node Ray cluster on this machine (Ray's own testing utility, ray.cluster_utils.Cluster):
a head with no CPUs, as KubeRay deployments usually have, and two 1-CPU worker nodes. `damoc select
--address` runs against it as a user's job would, in a subprocess; a node is lost by killing its
processes, and the driver is interrupted with SIGINT and SIGTERM. Every run must end with the ranking of
the undisturbed run, and never wait on a rung's timeout (it is an hour here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import QA_ROWS, spec_dict, write_jsonl, write_spec
from trainkit import hopeless_copy

from damoc.pipeline import MARKER

pytestmark = pytest.mark.slow
NODE_STORE = 100 * 1024 * 1024  # object store per node: three nodes share this machine's /dev/shm


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    # Whether it takes token authentication depends on what this process started before (Ray fixes the mode
    # once per process); the client, whose environment has no RAY_* variable, must manage either way.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": NODE_STORE})
    for _ in range(2):
        c.add_node(num_cpus=1, object_store_memory=NODE_STORE)
    c.wait_for_nodes()
    try:
        yield c
    finally:
        c.shutdown()


def worker_nodes(c) -> list:
    return [n for n in c.list_all_nodes() if n is not c.head_node]


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model) -> Path:
    """Three candidates, two trials at once (one per worker node); ASHA stops two, the winner trains on
    to the end (tune.finish_winner), so an interruption can land mid-sweep."""
    root = tmp_path_factory.mktemp("multinode")
    write_jsonl(root / "data" / "train.jsonl", QA_ROWS * 3)
    (root / "zoo").mkdir()
    good = tiny_model("llama", hidden=32, layers=2)
    os.symlink(good, root / "zoo" / "llama-s")
    os.symlink(tiny_model("gpt2", hidden=32, layers=2), root / "zoo" / "gpt2-s")
    hopeless_copy(good, root / "zoo" / "bad")
    write_spec(root / "job.yaml", spec_dict(**{
        "data.eval": {"split_ratio": 0.2}, "data.filter": {"method": "none"}, "data.compress": {"enabled": False},
        "candidates": [{"name": n, "path": f"zoo/{n}"} for n in ("llama-s", "gpt2-s", "bad")],
        "model": {"enabled": False},
        "finetune": {"num_workers": 1, "max_steps": 128, "eval_every": 4, "batch_size": 4, "lr": 5e-3},
        "tune": {"grace_period": 32, "reduction_factor": 2, "finish_winner": True, "rung_timeout_s": 3600}}))
    return root


class Run:
    """`damoc select job.yaml --address ...` in a subprocess, its output lines collected as they come."""

    def __init__(self, job: Path, address: str, out: str):
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        spec = json.loads(json.dumps(__import__("yaml").safe_load((job / "job.yaml").read_text())))
        write_spec(job / f"{out}.yaml", {**spec, "output_dir": f"runs/{out}"})
        self.run_dir = job / "runs" / out
        self.cmd = [sys.executable, "-m", "damoc", "select", f"{out}.yaml", "--address", address]
        self.job, self.env, self.lines = job, env, []

    def start(self) -> Run:
        self.proc = subprocess.Popen(self.cmd, cwd=self.job, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()
        return self

    def wait_for(self, text: str, after: int = 0, timeout: float = 600, count: int = 1) -> int:
        """The index of the `count`th line from `after` on that contains `text`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [i for i, line in enumerate(self.lines[after:], after) if text in line]
            if len(found) >= count:
                return found[count - 1]
            assert self.proc.poll() is None, f"ended before '{text}':\n" + "".join(self.lines)[-4000:]
            time.sleep(0.05)
        raise AssertionError(f"no '{text}' in {timeout}s:\n" + "".join(self.lines)[-4000:])

    def finish(self, timeout: float = 900) -> int:
        code = self.proc.wait(timeout=timeout)
        time.sleep(0.2)  # the reader thread's last lines
        return code

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def ranking(self) -> list[str]:
        return [c["name"] for c in json.loads((self.run_dir / "report" / "ranking.json").read_text())["candidates"]]

    def results(self) -> dict[str, dict]:
        data = json.loads((self.run_dir / "finetune" / "results.json").read_text())
        return {e["name"]: e for e in data["candidates"]}


@pytest.fixture(scope="module")
def undisturbed(cluster, job) -> Run:
    run = Run(job, cluster.address, "undisturbed").start()
    assert run.finish() == 0, run.text[-4000:]
    return run


def test_a_job_on_three_nodes_runs_trials_on_both_workers(cluster, undisturbed):
    results = undisturbed.results()
    assert set(undisturbed.ranking()) == {"llama-s", "gpt2-s", "bad"}
    assert undisturbed.ranking()[0] == "llama-s" and undisturbed.ranking()[-1] == "bad"
    ran_on = {n for e in results.values() for n in e["nodes"]}
    workers = {n.node_id for n in worker_nodes(cluster)}
    assert ran_on == workers  # trials landed on both worker nodes, none on the 0-CPU head
    assert "ray: connected to" in undisturbed.text


def test_a_node_lost_mid_finetune_restarts_its_trial_without_waiting_on_a_rung(cluster, job, undisturbed):
    run = Run(job, cluster.address, "node-lost").start()
    run.wait_for(" step    4 ", count=2)  # both trials past their first checkpoint: the victim's restarts from one
    victim = worker_nodes(cluster)[0]
    cluster.remove_node(victim, allow_graceful=False)  # its raylet and every worker on it, killed
    try:
        assert run.finish() == 0, run.text[-4000:]  # the rung timeout is an hour: no wait on it
    finally:
        cluster.add_node(num_cpus=1, object_store_memory=NODE_STORE)  # the next test's second node
        cluster.wait_for_nodes()
    assert f"node {victim.node_id[:12]} lost: " in run.text and "restarts from step" in run.text
    assert run.ranking() == undisturbed.ranking()
    results = run.results()
    lost = [e for e in results.values() if victim.node_id in e["nodes"]]
    assert lost and all(e["attempts"] >= 2 and e["earlier_seconds"] > 0 for e in lost)  # both attempts billed
    assert not (run.run_dir / "finetune.failed").exists()


def test_sigterm_then_sigint_mid_finetune_exit_interrupted_and_the_same_command_continues(cluster, job,
                                                                                           undisturbed):
    run = Run(job, cluster.address, "interrupted").start()
    run.wait_for(" step    4 ")
    run.proc.send_signal(signal.SIGTERM)  # how Kubernetes and `ray job stop` end a job
    assert run.finish() == 128 + signal.SIGTERM, run.text[-4000:]
    assert "interrupted (SIGTERM)" in run.text
    assert not (run.run_dir / "finetune" / MARKER).exists() and not (run.run_dir / "report").exists()

    run.start()  # the same command again: it resumes, and is interrupted once more (Ctrl-C)
    at = run.wait_for("resuming the sweep")
    run.wait_for(" step ", after=at + 1)
    run.proc.send_signal(signal.SIGINT)
    assert run.finish() == 128 + signal.SIGINT, run.text[-4000:]
    assert "interrupted (SIGINT)" in run.text
    assert not (run.run_dir / "finetune" / MARKER).exists()

    run.start()
    assert run.finish() == 0, run.text[-4000:]
    assert "resuming the sweep" in run.text
    assert run.ranking() == undisturbed.ranking()
    results = run.results()
    assert results["llama-s"]["status"] == "finished" and results["llama-s"]["steps"] == 128
    assert all(e["status"] in ("finished", "stopped_early") for e in results.values())
    cut = [e for e in results.values() if e["attempts"] > 1]  # running when a signal came: those seconds billed
    assert cut and all(e["earlier_seconds"] > 0 for e in cut)


def test_a_node_lost_during_the_data_stage_loses_no_row(cluster, job):
    """Filtering and token compression on (the reference LM's actors on both worker nodes); one node is
    killed while they run. Every input row ends kept, quarantined or dropped, in the manifest and the files."""
    import pyarrow.parquet as pq
    import yaml

    spec = yaml.safe_load((job / "job.yaml").read_text())
    write_jsonl(job / "data" / "big.jsonl", QA_ROWS * 20)
    spec["data"].update({"train": {"path": "data/big.jsonl"}, "filter": {"method": "hybrid", "keep_ratio": 0.5},
                         "compress": {"enabled": True, "ratio": 0.6}})
    write_spec(job / "job.yaml", spec)
    try:
        run = Run(job, cluster.address, "data-node-lost")
    finally:
        write_spec(job / "job.yaml", {**spec, "data": {**spec["data"], "train": {"path": "data/train.jsonl"}}})
    run.cmd += ["--stages", "data"]
    run.start()
    run.wait_for("ray: connected")
    time.sleep(3)  # the first pass is under way (it reads and scores for ~10 s here)
    cluster.remove_node(worker_nodes(cluster)[0], allow_graceful=False)
    try:
        assert run.finish() == 0, run.text[-4000:]
    finally:
        cluster.add_node(num_cpus=1, object_store_memory=NODE_STORE)
        cluster.wait_for_nodes()
    m = json.loads((run.run_dir / "data" / "manifest.json").read_text())
    dropped = sum(m["dropped"].values())
    assert m["input"] == len(QA_ROWS) * 20 == m["kept"] + m["quarantined"] + dropped
    files = run.run_dir / "data"
    assert pq.ParquetFile(files / "train.parquet").metadata.num_rows == m["kept"]
    assert pq.ParquetFile(files / "eval.parquet").metadata.num_rows == m["dropped"]["held_out_eval"] == m["eval"]["rows"]
    assert pq.ParquetFile(files / "dropped.parquet").metadata.num_rows == dropped - m["eval"]["rows"]
    assert len((files / "quarantine.jsonl").read_text().splitlines()) == m["quarantined"]
