"""The embedded runtime: starts, binds to 127.0.0.1, takes `ray job submit`, stops only itself."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
import uuid

import psutil
import pytest
from raycluster import start_head

from damoc.runtime import DEFAULT_TOKEN_PATH, connect


@pytest.fixture(scope="module")
def other_head():
    head = start_head(num_cpus=1)
    yield head
    head.stop()


@pytest.fixture
def no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def listening_hosts(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
            and c.status == psutil.CONN_LISTEN}


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def submit(dashboard_url: str, code: str) -> tuple[subprocess.CompletedProcess, str]:
    """`ray job submit` from a clean client environment, as a user's shell would run it; then
    the job's whole log (`submit` follows the log as it streams and can miss its last line)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_AUTH_MODE"] = "token"
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    address = f"http://{dashboard_url}"
    for attempt in range(60):  # the job agent registers a few seconds after the head is up
        job_id = f"damoc-test-{uuid.uuid4().hex[:8]}"
        r = subprocess.run([ray_bin, "job", "submit", "--address", address, "--submission-id", job_id, "--",
                            sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
        if r.returncode == 0 or "No available agent" not in r.stderr:
            break
        time.sleep(1)
    logs = subprocess.run([ray_bin, "job", "logs", "--address", address, job_id],
                          capture_output=True, text=True, timeout=120, env=env)
    return r, logs.stdout


def test_embedded_cluster_lifecycle(no_ray_address, other_head):
    rt = connect(None, num_cpus=2)
    try:
        assert rt.embedded and rt.address != other_head.address
        import ray

        assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42
        assert ray.cluster_resources()["CPU"] == 2
        host, port = rt.dashboard_url.split(":")
        assert host == "127.0.0.1" and listening_hosts(int(port)) == {"127.0.0.1"}
        assert os.environ["RAY_ADDRESS"] == rt.address  # trials started from here find this cluster
        if DEFAULT_TOKEN_PATH.exists():
            assert stat.S_IMODE(DEFAULT_TOKEN_PATH.stat().st_mode) & 0o077 == 0
        r, logs = submit(rt.dashboard_url, "import ray; ray.init(); print('JOB-CPU', ray.cluster_resources()['CPU'])")
        assert r.returncode == 0, r.stderr[-2000:]
        assert "JOB-CPU 2.0" in logs
    finally:
        rt.shutdown()
    assert not port_open("127.0.0.1", int(port))
    assert "RAY_ADDRESS" not in os.environ and not os.path.exists(rt.temp_dir)
    assert other_head.alive(), "stopping our cluster must leave the other instance running"


def test_connect_to_address_never_stops_that_cluster(no_ray_address, other_head):
    rt = connect(other_head.address)
    import ray

    assert not rt.embedded and ray.cluster_resources()["CPU"] == 1
    rt.shutdown()
    assert not ray.is_initialized()
    assert other_head.alive()


def test_ray_address_env_selects_the_cluster(monkeypatch, other_head):
    monkeypatch.setenv("RAY_ADDRESS", other_head.address)
    with connect(None) as rt:
        assert not rt.embedded and rt.address == other_head.address
    assert other_head.alive()


def test_refuses_to_init_twice(no_ray_address, other_head):
    with connect(other_head.address):
        with pytest.raises(RuntimeError, match="already initialised"):
            connect(other_head.address)
