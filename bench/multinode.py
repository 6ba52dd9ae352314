"""The demo job on a three-node Ray cluster on this machine: undisturbed, with a worker node killed
mid-finetune, and interrupted with SIGINT then run again. Wall seconds (every invocation), worker-seconds
(the report's, every attempt) and the rankings, written to bench/results/multinode.md. The cluster is Ray's
own testing utility: a head without CPUs (as on KubeRay) and two 1-CPU worker nodes. Never run by the
test suite (tests/test_multinode.py checks the same promises on a smaller job).

    .venv/bin/python -m bench.multinode            # builds zoo/demo first if it is missing
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STORE = 100 * 1024 * 1024  # object store per node: three nodes share this machine's /dev/shm


class Invocation:
    """`damoc select SPEC --address A` in a subprocess, its output lines collected as they come."""

    def __init__(self, spec: Path, address: str):
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.t0, self.lines = time.monotonic(), []
        self.proc = subprocess.Popen([sys.executable, "-m", "damoc", "select", str(spec), "--address", address],
                                     cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def wait_for(self, text: str, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in ln for ln in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no '{text}':\n" + "".join(self.lines)[-3000:])
            time.sleep(0.05)

    def finish(self) -> tuple[int, float]:
        code = self.proc.wait(timeout=1800)
        return code, time.monotonic() - self.t0


def variant_spec(base: Path, name: str, output_dir: str | None = None) -> Path:
    spec = yaml.safe_load(base.read_text())
    spec["output_dir"] = output_dir or f"runs/bench-multinode/{name}"
    out = REPO / "runs" / "bench-multinode" / f"{name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def read_run(run: str, rel: str) -> dict:
    from damoc import store

    if store.is_remote(run):
        return json.loads(store.get_bytes(f"{run}/{rel}"))
    return json.loads((REPO / run / rel).read_text())


def outcome(name: str, codes: list[int], seconds: float, lines: list[str], run: str | None = None) -> dict:
    run = run or f"runs/bench-multinode/{name}"
    ranking, results = read_run(run, "report/ranking.json"), read_run(run, "finetune/results.json")
    return {"run": name, "exit codes": codes, "wall_s": round(seconds, 1),
            "worker_s": round(sum(e.get("worker_seconds", 0.0) for e in results["candidates"]), 1),
            "ranking": [c["name"] for c in ranking["candidates"]],
            "attempts": {e["name"]: e.get("attempts", 1) for e in results["candidates"]},
            "events": [ln.split("finetune: ", 1)[-1].strip() for ln in lines if " lost: " in ln or "yields" in ln]}


def start_s3():
    """tests/s3server.py's moto server (a test helper, loaded from its file), bucket `damoc-bench`."""
    from bench.harness import test_helper

    server = test_helper("s3server").s3_server("damoc-bench")
    server.__enter__()
    return server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="jobs/demo.yaml")
    ap.add_argument("--out", default="bench/results/multinode.md")
    ap.add_argument("--s3", action="store_true", help="also run it with the run directory on S3 (a moto server "
                    "on 127.0.0.1, as tests/test_object_storage.py starts it), no volume shared by the runs' nodes")
    a = ap.parse_args()
    s3 = start_s3() if a.s3 else None  # before the nodes start: they take its endpoint from the environment
    if not (REPO / "zoo" / "demo" / "zoo.json").is_file():
        subprocess.run([sys.executable, "-m", "damoc", "zoo", "build", "--out", "zoo/demo", "--preset", "demo"],
                       cwd=REPO, check=True)
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": STORE})
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=STORE)
    cluster.wait_for_nodes()
    base, rows = REPO / a.spec, []
    try:
        spec = variant_spec(base, "undisturbed")
        inv = Invocation(spec, cluster.address)
        code, seconds = inv.finish()
        rows.append(outcome("undisturbed", [code], seconds, inv.lines))

        spec = variant_spec(base, "node-lost")
        inv = Invocation(spec, cluster.address)
        inv.wait_for(" step   10 ")  # a trial past its first checkpoint
        cluster.remove_node([n for n in cluster.list_all_nodes() if n is not cluster.head_node][0],
                            allow_graceful=False)
        code, seconds = inv.finish()
        cluster.add_node(num_cpus=1, object_store_memory=STORE)
        cluster.wait_for_nodes()
        rows.append(outcome("node-lost", [code], seconds, inv.lines))

        spec = variant_spec(base, "sigint-then-again")
        first = Invocation(spec, cluster.address)
        first.wait_for(" step   10 ")
        first.proc.send_signal(signal.SIGINT)
        code1, s1 = first.finish()
        again = Invocation(spec, cluster.address)
        code2, s2 = again.finish()
        rows.append(outcome("sigint-then-again", [code1, code2], s1 + s2, first.lines + again.lines))

        if s3 is not None:
            where = f"s3://damoc-bench/multinode-{int(time.time())}"
            inv = Invocation(variant_spec(base, "s3", where), cluster.address)
            code, seconds = inv.finish()
            rows.append(outcome("undisturbed, run directory on S3", [code], seconds, inv.lines, where))
    finally:
        cluster.shutdown()
        if s3 is not None:
            s3.__exit__(None, None, None)
    same = all(r["ranking"] == rows[0]["ranking"] for r in rows)
    text = ["# The demo on three nodes (bench/multinode.py)", "",
            f"`{a.spec}` via `--address` on a Ray cluster of a 0-CPU head and two 1-CPU worker nodes on one "
            "2-core machine (ray.cluster_utils.Cluster). Wall: every invocation of the run; worker-s: the "
            "finetune stage's trials, every attempt."
            + (" The last row (--s3): output_dir on S3 (a moto server on 127.0.0.1): the model stage's actors "
               "upload the compressed models, the trials fetch them and the rows into the node cache, and "
               "checkpoints go to the bucket." if s3 is not None else ""), "",
            "| run | exit codes | wall s | finetune worker-s | ranking | attempts | events |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        text.append(f"| {r['run']} | {r['exit codes']} | {r['wall_s']} | {r['worker_s']} | {' > '.join(r['ranking'])} | "
                    f"{r['attempts']} | {'; '.join(r['events']) or '-'} |")
    text += ["", f"Rankings {'match' if same else 'DIFFER'}."]
    Path(REPO / a.out).write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
