#!/usr/bin/env bash
# Submit a DaMoC job to a Ray cluster and follow it:
#   RAY_ADDRESS=http://127.0.0.1:8265 jobs/submit.sh jobs/medical_qa.yaml [--no-wait]
# RAY_ADDRESS is the cluster's dashboard (a port-forward on KubeRay, `ray dashboard
# cluster/aws.yaml` with the launcher). The repository is the working dir; DAMOC_RUNTIME_ENV
# picks the runtime env (default cluster/runtime_env.yaml). The HF token is *not* sent from
# here: the cluster's nodes get it from their own environment (k8s Secret / secrets manager).
set -euo pipefail
cd "$(dirname "$0")/.."
spec="${1:?usage: jobs/submit.sh JOB.yaml [--no-wait]}"
shift
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster dashboard, e.g. http://127.0.0.1:8265}"
runtime_env="${DAMOC_RUNTIME_ENV:-cluster/runtime_env.yaml}"
bin=.venv/bin; [ -x "$bin/python" ] || bin="$(dirname "$(command -v python3)")"
"$bin/python" -m damoc validate "$spec"   # a bad spec fails here, before any cluster work
name="damoc-$(basename "$spec" .yaml)-$(date +%Y%m%d-%H%M%S)"
"$bin/ray" job submit --address "$RAY_ADDRESS" --submission-id "$name" --working-dir . \
  --runtime-env "$runtime_env" "$@" -- python -m damoc select "$spec"
echo "job $name: ray job logs --address $RAY_ADDRESS --follow $name"
