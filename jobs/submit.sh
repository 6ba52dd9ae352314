#!/usr/bin/env bash
# Submit a DaMoC job to a Ray cluster and follow it:
#   RAY_ADDRESS=http://127.0.0.1:8265 jobs/submit.sh jobs/medical_qa.yaml [--no-wait] [--fresh]
# After a failure (a lost head node, a preempted GPU, a killed job), run the same line again: the
# run resumes in its run directory (stages whose inputs are unchanged are kept; an interrupted
# fine-tuning sweep continues from its checkpoints in finetune.storage_path). --fresh recomputes
# everything. Other options go to `ray job submit`.
# RAY_ADDRESS is the cluster's dashboard (a port-forward on KubeRay, `ray dashboard
# cluster/aws.yaml` with the launcher). The repository is the working dir; DAMOC_RUNTIME_ENV
# picks the runtime env (default cluster/runtime_env.yaml). The HF token is *not* sent from
# here: the cluster's nodes get it from their own environment (k8s Secret / secrets manager).
set -euo pipefail
cd "$(dirname "$0")/.."
spec="${1:?usage: jobs/submit.sh JOB.yaml [--no-wait] [--fresh]}"
shift
damoc_args=(); ray_args=()
for a in "$@"; do
  case "$a" in --fresh|--resume) damoc_args+=("$a") ;; *) ray_args+=("$a") ;; esac
done
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster dashboard, e.g. http://127.0.0.1:8265}"
runtime_env="${DAMOC_RUNTIME_ENV:-cluster/runtime_env.yaml}"
bin=.venv/bin; [ -x "$bin/python" ] || bin="$(dirname "$(command -v python3)")"
"$bin/python" -m damoc validate "$spec"   # a bad spec fails here, before any cluster work
name="damoc-$(basename "$spec" .yaml)-$(date +%Y%m%d-%H%M%S)"
"$bin/ray" job submit --address "$RAY_ADDRESS" --submission-id "$name" --working-dir . \
  --runtime-env "$runtime_env" "${ray_args[@]}" -- python -m damoc select "$spec" "${damoc_args[@]}"
echo "job $name: ray job logs --address $RAY_ADDRESS --follow $name"
