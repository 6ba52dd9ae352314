"""From laptop to cluster: `ray job submit` of `damoc select` to a separate Ray head, the
damoc_ series on its metrics endpoint during the run, and the deploy files in jobs/, cluster/
and k8s/ checked for what Ray and KubeRay need."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import spec_dict, write_spec
from raycluster import add_worker, free_port, start_head

REPO = Path(__file__).resolve().parents[1]


def scrape_all(ports: list[int]) -> set[str]:
    return set().union(*(scrape(p) for p in ports))


def scrape(port: int) -> set[str]:
    """Names of the damoc series on a Ray metrics endpoint (Ray prefixes them `ray_`)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return set()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("ray_damoc_")}


@pytest.mark.slow
def test_submit_sh_runs_a_selection_and_exports_damoc_metrics(job_dir, tiny_model, tmp_path):
    """jobs/submit.sh as the README runs it, against a token-authenticated three-node cluster (a head with
    no CPUs, as KubeRay's usually is, and two 1-CPU worker nodes): its spec's relative paths point into zoo/
    (which the runtime env excludes) and reach every node; the token is picked up."""
    folder = REPO / "zoo" / f"_submit-{uuid.uuid4().hex[:8]}"  # inside the working dir that is uploaded
    rel = folder.relative_to(REPO)
    shutil.copytree(job_dir / "data", folder / "data")
    for name, family in (("llama-s", "llama"), ("gpt2-s", "gpt2")):
        shutil.copytree(tiny_model(family), folder / "models" / name)
    spec = spec_dict(**{
        "name": "submitted", "output_dir": str(tmp_path / "runs" / "submitted"),
        "data.train": {"path": f"{rel}/data/train.jsonl"}, "data.eval": {"split_ratio": 0.2},
        "data.filter": {"method": "none"}, "data.compress": {"enabled": True, "ratio": 0.6},
        "candidates": [{"name": n, "path": f"{rel}/models/{n}"} for n in ("llama-s", "gpt2-s")],
        "model.prune_ratio": 0.25,
        "finetune": {"num_workers": 1, "max_steps": 8, "eval_every": 4, "batch_size": 4,
                     "deepspeed": {"enabled": False}},
        "tune": {"grace_period": 4}})
    write_spec(folder / "job.yaml", spec)
    ports = [free_port() for _ in range(3)]  # each node's metrics endpoint (Prometheus scrapes them all)
    try:
        head = start_head(num_cpus=0, metrics_port=ports[0])
        for port in ports[1:]:
            add_worker(head, num_cpus=1, metrics_port=port)
    except BaseException:
        if "head" in locals():
            head.stop()
        shutil.rmtree(folder, ignore_errors=True)
        raise
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no RAY_AUTH_MODE: submit.sh sets it
    env.update(RAY_ADDRESS=f"http://{head.dashboard_url}", DAMOC_RUNTIME_ENV="cluster/runtime_env.image.yaml",
               DAMOC_CLUSTER_PYTHON=sys.executable)  # the cluster's nodes run this virtualenv's interpreter
    ray_bin, address = str(Path(sys.executable).parent / "ray"), f"http://{head.dashboard_url}"
    try:
        for _ in range(60):  # the job agent registers a few seconds after the head is up
            r = subprocess.run([str(REPO / "jobs" / "submit.sh"), f"{rel}/job.yaml", "--no-wait"],
                               capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
            if r.returncode == 0 or "No available agent" not in r.stderr:
                break
            time.sleep(1)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        shipped = next(ln for ln in r.stderr.splitlines() if "shipped from the excluded zoo" in ln)
        assert f"{rel}/data/train.jsonl" in shipped and f"{rel}/models/gpt2-s" in shipped
        job_id = re.search(r"job (damoc-job-\S+): ray job logs", r.stdout).group(1)
        env["RAY_AUTH_MODE"] = "token"
        seen: set[str] = set()
        status, deadline = "PENDING", time.monotonic() + 900
        while time.monotonic() < deadline:
            seen |= scrape_all(ports)
            st = subprocess.run([ray_bin, "job", "status", "--address", address, job_id], capture_output=True,
                                text=True, timeout=60, env=env)
            status = (st.stdout + st.stderr).lower()  # the CLI logs "Job '...' succeeded" to stderr
            if any(s in status for s in ("succeeded", "failed", "stopped")):
                break
            time.sleep(2)
        logs = subprocess.run([ray_bin, "job", "logs", "--address", address, job_id], capture_output=True,
                              text=True, timeout=120, env=env).stdout
        assert "succeeded" in status, logs[-4000:]
        ranking = json.loads((tmp_path / "runs/submitted/report/ranking.json").read_text())
        assert {c["name"] for c in ranking["candidates"]} == {"llama-s", "gpt2-s"}
        results = json.loads((tmp_path / "runs/submitted/finetune/results.json").read_text())
        assert len({n for c in results["candidates"] for n in c.get("nodes") or []}) == 2  # one trial per worker
        assert "ray: connected to" in logs and "embedded" not in logs  # it joined this cluster
        assert "report: " in logs and "gpt2-s" in logs  # the ranking table and the report path, in the job log
        for _ in range(10):  # the last values reach the exporter within its report interval
            if {"ray_damoc_rows_read", "ray_damoc_train_loss", "ray_damoc_stage_seconds"} <= seen:
                break
            time.sleep(2)
            seen |= scrape_all(ports)
        assert {"ray_damoc_rows_read", "ray_damoc_rows_kept", "ray_damoc_prompt_tokens", "ray_damoc_layers_removed",
                "ray_damoc_train_loss", "ray_damoc_eval_metric", "ray_damoc_stage_seconds"} <= seen, seen
    finally:
        head.stop()
        shutil.rmtree(folder, ignore_errors=True)
    assert not head.processes()  # only that cluster was stopped, and all of it


# ---------------------------------------------------------------- deploy files


def test_every_job_spec_validates_offline():
    damoc = [sys.executable, "-m", "damoc", "validate"]
    for path in sorted((REPO / "jobs").glob("*.yaml")):
        if path.name == "demo.yaml":
            continue  # its candidates are the built demo zoo: test_zoo.py validates it after building
        r = subprocess.run([*damoc, str(path)], capture_output=True, text=True, cwd=REPO,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert r.returncode == 0, (path.name, r.stderr)
    real = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "jobs").glob("*.yaml")) if p.name != "demo.yaml"]
    assert {s["data"]["task"] for s in real} == {"qa", "reading_comprehension"} and len(real) == 4
    for s in real:  # real clusters: hub candidates, GPUs, DeepSpeed, a shared storage path
        assert all(c.get("hf") for c in s["candidates"]) and s["finetune"]["use_gpu"]
        assert s["finetune"]["deepspeed"]["zero_stage"] in (2, 3) and s["finetune"]["storage_path"].startswith("/mnt/damoc")


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def test_kuberay_manifests_carry_what_kuberay_needs():
    docs = {d["kind"]: d for p in (REPO / "k8s").rglob("*.yaml") if p.name != "kustomization.yaml"
            and "object-storage" not in p.parts for d in load_all(p)}
    assert set(docs) == {"RayCluster", "RayJob", "Service", "PersistentVolumeClaim", "PodMonitor"}
    rc = docs["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1" and rc["spec"]["rayVersion"].startswith("2.60")
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    pods = [head["template"]["spec"]] + [g["template"]["spec"] for g in rc["spec"]["workerGroupSpecs"]]
    assert not any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in containers(pods[0]))
    gpu_groups = [g for g in rc["spec"]["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]
    assert gpu_groups
    for g in gpu_groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["maxReplicas"] > 0
        assert any(t["key"] == "nvidia.com/gpu" for t in g["template"]["spec"]["tolerations"])
    claim = docs["PersistentVolumeClaim"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    job_specs = [docs["RayJob"]["spec"]["submitterPodTemplate"]["spec"]]
    for pod in pods + job_specs:  # non-root, no privilege escalation, everywhere
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        for c in containers(pod):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    for pod in pods:
        ray_c = pod["containers"][0]
        assert {"name": "shared", "mountPath": "/mnt/damoc"} in ray_c["volumeMounts"]
        assert {"name": "shared", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}} in pod["volumes"]
        token = next(e for e in ray_c["env"] if e["name"] == "HF_TOKEN")
        assert set(token) == {"name", "valueFrom"} and "secretKeyRef" in token["valueFrom"]  # never a literal
        assert any(p["name"] == "metrics" and p["containerPort"] == 8080 for p in ray_c["ports"])
    assert docs["RayJob"]["spec"]["clusterSelector"] == {"ray.io/cluster": rc["metadata"]["name"]}
    # a retried RayJob resumes its run (damoc select resumes by default; --fresh would throw work away)
    assert docs["RayJob"]["spec"]["backoffLimit"] >= 1 and "--fresh" not in docs["RayJob"]["spec"]["entrypoint"]
    svc = docs["Service"]
    assert svc["spec"]["type"] == "ClusterIP" and svc["spec"]["selector"]["ray.io/node-type"] == "head"
    assert [p["port"] for p in svc["spec"]["ports"]] == [8265]
    pm = docs["PodMonitor"]
    assert pm["spec"]["selector"]["matchLabels"] == {"ray.io/cluster": rc["metadata"]["name"]}
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    kust = yaml.safe_load((REPO / "k8s/kustomization.yaml").read_text())
    base = yaml.safe_load((REPO / "k8s/base/kustomization.yaml").read_text())
    assert kust["resources"] == ["base", "storage.yaml"]
    for res in base["resources"]:
        assert (REPO / "k8s/base" / res).is_file()
    assert {d["metadata"].get("namespace") for d in docs.values()} == {kust["namespace"]} == {base["namespace"]}


CRDS = Path(os.environ.get("DAMOC_KUBERAY_CRDS", REPO.parent / "shared" / "kuberay-crds"))


def kustomize(folder: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed here")
    r = subprocess.run([kubectl, "kustomize", str(REPO / folder)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def crd_schema(kind: str) -> dict:
    """The v1 openAPIV3Schema of KubeRay's CRD for `kind` (ray.io_rayclusters.yaml, ...)."""
    path = CRDS / f"ray.io_{kind.lower()}s.yaml"
    if not path.is_file():
        pytest.skip(f"KubeRay's CRD schemas are not here ({path}; set DAMOC_KUBERAY_CRDS)")
    crd = yaml.safe_load(path.read_text())
    return next(v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == "v1")


@pytest.mark.parametrize("folder", ["k8s", "k8s/object-storage"])
def test_both_kuberay_deployments_render_and_match_kuberays_crds(folder):
    """Both deployments, as `kubectl apply -k` renders them, against KubeRay's own CRD schemas; the
    object-storage one mounts no shared volume and gives every Ray pod the bucket's Secret and a node cache."""
    import jsonschema

    docs = kustomize(folder) + (load_all(REPO / "k8s/rayjob.yaml") if folder == "k8s" else [])
    for d in docs:
        if d["kind"] in ("RayCluster", "RayJob"):
            errors = sorted(jsonschema.Draft7Validator(crd_schema(d["kind"])).iter_errors(d), key=str)
            assert not errors, f"{folder} {d['kind']}: " + "; ".join(
                f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])
    kinds = {d["kind"]: d for d in docs}
    assert {"RayCluster", "RayJob", "Service", "PodMonitor"} <= set(kinds)
    if folder != "k8s/object-storage":
        assert "PersistentVolumeClaim" in kinds
        return
    assert "PersistentVolumeClaim" not in kinds
    rc = kinds["RayCluster"]
    pods = [rc["spec"]["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in rc["spec"]["workerGroupSpecs"]]
    for pod in pods:
        assert not any("persistentVolumeClaim" in v for v in pod["volumes"])
        ray_c = pod["containers"][0]
        assert {"secretRef": {"name": "damoc-object-store"}} in ray_c["envFrom"]
        assert {"name": "DAMOC_CACHE", "value": "/mnt/cache"} in ray_c["env"]
        assert {"name": "cache", "mountPath": "/mnt/cache"} in ray_c["volumeMounts"]
        assert not any(m["mountPath"] == "/mnt/damoc" for m in ray_c["volumeMounts"])
    entry = kinds["RayJob"]["spec"]["entrypoint"]
    sets = re.findall(r'--set "([^"]+)"', entry)
    assert sets == ["output_dir=$DAMOC_BUCKET_URI/runs/medical-qa", "finetune.storage_path=$DAMOC_BUCKET_URI/ray"]
    from damoc.spec import load_spec

    spec = load_spec(REPO / "jobs/medical_qa.yaml", overrides=[s.replace("$DAMOC_BUCKET_URI", "s3://b/damoc") for s in sets])
    assert spec.output_dir == "s3://b/damoc/runs/medical-qa" and spec.finetune.storage_path == "s3://b/damoc/ray"


def test_grafana_dashboard_plots_every_damoc_metric():
    from damoc.metrics import METRICS

    dash = json.loads((REPO / "k8s/base/monitoring/grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for name in METRICS:
        assert name.startswith("damoc_") and f"ray_{name}{{" in exprs


def test_cluster_launcher_and_runtime_env():
    aws = yaml.safe_load((REPO / "cluster/aws.yaml").read_text())
    head_type = aws["available_node_types"][aws["head_node_type"]]
    assert "GPU" not in head_type.get("resources", {}) and aws["docker"]["image"].startswith("rayproject/ray:2.60")
    gpu = aws["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 < gpu["max_workers"]
    start = " ".join(aws["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "--metrics-export-port" in start
    assert "HF_TOKEN=" not in yaml.safe_dump(aws).replace('HF_TOKEN="$(', "")  # read from a secret store only
    for name in ("runtime_env.yaml", "runtime_env.image.yaml"):
        env = yaml.safe_load((REPO / "cluster" / name).read_text())
        assert {".venv", ".git", "runs"} <= set(env["excludes"]) and "HF_TOKEN" not in env.get("env_vars", {})
    pins = yaml.safe_load((REPO / "cluster/runtime_env.yaml").read_text())["pip"]["packages"]
    assert not any(p.startswith("ray") for p in pins)  # the cluster's own Ray, never a second one
    r = subprocess.run(["bash", "-n", str(REPO / "jobs/submit.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_runtime_env_ships_what_the_spec_names_and_refuses_what_it_cannot(tmp_path, tiny_model):
    """`damoc runtime-env`: excluded folders (and .gitignore's) narrowed to the named files; a relative path
    outside the working dir refused naming its key; an absolute one flagged."""
    from damoc.cluster_env import runtime_env_for
    from damoc.spec import spec_from_data

    root = tmp_path / "repo"
    (root / "zoo" / "demo" / "data").mkdir(parents=True)
    (root / "zoo" / "demo" / "data" / "train.jsonl").write_text('{"instruction": "q", "output": "a"}\n')
    (root / "zoo" / "demo" / "data" / "other.jsonl").write_text("")
    (root / "zoo" / "bench").mkdir()
    shutil.copytree(tiny_model("llama"), root / "zoo" / "demo" / "models" / "llama-s")
    (root / ".gitignore").write_text("# local state\n/zoo/\n/runs/\n")
    data = spec_dict(**{"data.train": {"path": "zoo/demo/data/train.jsonl"},
                        "candidates": [{"name": "llama-s", "path": "zoo/demo/models/llama-s"}]})
    cwd = os.getcwd()
    os.chdir(root)
    try:
        spec = spec_from_data(data, base_dir=str(root))
        env, problems, notes = runtime_env_for(spec, {"excludes": ["zoo", ".git"], "env_vars": {"A": "1"}}, root)
        assert not problems and env["env_vars"] == {"A": "1"}
        assert "zoo" not in env["excludes"] and "/zoo/" not in env["excludes"] and "/runs/" in env["excludes"]
        assert {"/zoo/bench", "/zoo/demo/data/other.jsonl"} <= set(env["excludes"])
        assert not any(e.startswith(("/zoo/demo/models", "/zoo/demo/data/train")) for e in env["excludes"])
        outside = tmp_path / "elsewhere.jsonl"
        outside.write_text("")
        spec = spec_from_data({**data, "data": {"train": {"path": "../elsewhere.jsonl"}}}, base_dir=str(root))
        _, problems, _ = runtime_env_for(spec, {}, root)
        assert problems and problems[0].startswith("data.train.path: ../elsewhere.jsonl is outside")
        spec = spec_from_data({**data, "data": {"train": {"path": str(outside)}}}, base_dir=str(root))
        _, problems, notes = runtime_env_for(spec, {}, root)
        assert not problems and any("absolute path: it must exist on every node" in n for n in notes)
    finally:
        os.chdir(cwd)


def test_the_cluster_entrypoint_names_an_interpreter_without_damocs_dependencies():
    r = subprocess.run(["sh", str(REPO / "jobs" / "entrypoint.sh"), "/bin/false", "select", "job.yaml"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "lacks DaMoC's dependencies" in r.stderr and "DAMOC_CLUSTER_PYTHON" in r.stderr
