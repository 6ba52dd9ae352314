"""A separate Ray head on this host, started with `ray start` and stopped by its own pids only.

Stands for "somebody else's Ray instance": tests use it to show that DaMoC connects to a
given cluster without stopping it, and never touches an instance it did not start.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    address: str
    dashboard_url: str
    temp_dir: str
    worker_dirs: list[str] = field(default_factory=list)  # temp dirs of the worker nodes joined to it

    def processes(self) -> list[psutil.Process]:
        """Its processes: those naming its temp dir or GCS address, and all their descendants."""
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["cmdline"]):
            args = p.info["cmdline"] or []
            if any(self.temp_dir in a or self.address in a for a in args):
                for q in [p, *p.children(recursive=True)]:
                    found[q.pid] = q
        return list(found.values())

    def alive(self) -> bool:
        """Whether a fresh driver can still connect to it and see its CPU."""
        code = f"import ray; ray.init(address='{self.address}'); print('CPU', ray.cluster_resources().get('CPU'))"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, RAY_AUTH_MODE="token"))
        return r.returncode == 0 and "CPU 1.0" in r.stdout

    def stop(self) -> None:
        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        for d in [self.temp_dir, *self.worker_dirs]:
            shutil.rmtree(d, ignore_errors=True)


def add_worker(head: Head, num_cpus: int = 1, metrics_port: int | None = None) -> None:
    """A worker node joined to `head` with `ray start --address`, as on a second machine: its own ports and
    its own temp dir (this host runs several raylets; sharing the head's, their runtime-env agents would
    collect each other's working_dir packages, the job's current directory among them), the head's token.
    `head.stop()` stops it too (it names the head's GCS address)."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    temp_dir = tempfile.mkdtemp(prefix="rw", dir="/tmp")
    head.worker_dirs.append(temp_dir)
    cmd = [ray_bin, "start", f"--address={head.address}", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
           f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={metrics_port or free_port()}",
           "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=dict(os.environ, RAY_AUTH_MODE="token"))
    if out.returncode != 0:
        raise RuntimeError(f"ray start --address failed ({out.returncode}):\n{(out.stdout + out.stderr)[-2000:]}")


def start_head(num_cpus: int = 1, metrics_port: int | None = None) -> Head:
    # Short path: Ray's unix sockets live under it and must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    ray_bin = str(Path(sys.executable).parent / "ray")
    cmd = [ray_bin, "start", "--head", f"--temp-dir={temp_dir}", "--port=0", f"--num-cpus={num_cpus}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    if metrics_port:
        cmd.append(f"--metrics-export-port={metrics_port}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=dict(os.environ, RAY_AUTH_MODE="token"))
    text = out.stdout + out.stderr
    addr = re.search(r"ray start --address='([^']+)'", text)
    dash = re.search(r"RAY_API_SERVER_ADDRESS='http://([^']+)'", text)
    if out.returncode != 0 or not addr or not dash:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise RuntimeError(f"ray start failed ({out.returncode}):\n{text[-2000:]}")
    return Head(addr.group(1), dash.group(1), temp_dir)
