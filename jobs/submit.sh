#!/usr/bin/env bash
# Submit a DaMoC job to a Ray cluster and follow it:
#   RAY_ADDRESS=http://127.0.0.1:8265 jobs/submit.sh jobs/medical_qa.yaml [--no-wait] [--fresh] [--set K=V]
# After a failure (a lost head node, a preempted GPU, a killed job), run the same line again: the
# run resumes in its run directory (stages whose inputs are unchanged are kept; an interrupted
# fine-tuning sweep continues from its checkpoints in finetune.storage_path). --fresh recomputes
# everything. --set KEY.PATH=VALUE overrides a spec key (e.g. --set output_dir=s3://bucket/runs/x for a
# cluster whose nodes share no volume). Other options go to `ray job submit`.
# RAY_ADDRESS is the cluster's dashboard (a port-forward on KubeRay, `ray dashboard
# cluster/aws.yaml` with the launcher). The repository is the working dir; DAMOC_RUNTIME_ENV
# picks the runtime env (default cluster/runtime_env.yaml), narrowed by `damoc runtime-env` so that
# the files the spec names (e.g. the demo's zoo/demo/...) are uploaded with it. DAMOC_CLUSTER_PYTHON
# is the interpreter the job runs with on the cluster (default: `python` there: the pip runtime env's,
# or the image's). The HF token is *not* sent from here: the cluster's nodes get it from their own
# environment (k8s Secret / secrets manager).
set -euo pipefail
cd "$(dirname "$0")/.."
spec="${1:?usage: jobs/submit.sh JOB.yaml [--no-wait] [--fresh]}"
shift
damoc_args=(); set_args=(); ray_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --fresh|--resume) damoc_args+=("$1") ;;
    --set) set_args+=("$1" "${2:?--set needs KEY.PATH=VALUE}"); shift ;;
    --set=*) set_args+=("$1") ;;
    *) ray_args+=("$1") ;;
  esac
  shift
done
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster dashboard, e.g. http://127.0.0.1:8265}"
base_env="${DAMOC_RUNTIME_ENV:-cluster/runtime_env.yaml}"
bin=.venv/bin; [ -x "$bin/python" ] || bin="$(dirname "$(command -v python3)")"
# Clusters started with `ray start` (Ray >= 2.52) take token authentication: with a token at hand, use it.
if [ -z "${RAY_AUTH_MODE:-}" ] && { [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -s "$HOME/.ray/auth_token" ]; }; then
  export RAY_AUTH_MODE=token
fi
"$bin/python" -m damoc validate "$spec" "${set_args[@]}"   # a bad spec fails here, before any cluster work
runtime_env="$(mktemp "${TMPDIR:-/tmp}/damoc-runtime-env-XXXXXX.yaml")"
trap 'rm -f "$runtime_env" "$runtime_env.err"' EXIT
"$bin/python" -m damoc runtime-env "$spec" "${set_args[@]}" --base "$base_env" > "$runtime_env"
# .gitignore's patterns are in that runtime env's excludes, narrowed; Ray's own reading of .gitignore could
# not be narrowed (the demo's zoo/ is ignored by git).
export RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1
name="damoc-$(basename "$spec" .yaml)-$(date +%Y%m%d-%H%M%S)"
set +e
"$bin/ray" job submit --address "$RAY_ADDRESS" --submission-id "$name" --working-dir . \
  --runtime-env "$runtime_env" "${ray_args[@]}" -- \
  sh jobs/entrypoint.sh "${DAMOC_CLUSTER_PYTHON:-python}" select "$spec" "${set_args[@]}" "${damoc_args[@]}" 2> "$runtime_env.err"
code=$?
set -e
cat "$runtime_env.err" >&2
if grep -qi "authentication" "$runtime_env.err" 2>/dev/null; then
  echo "jobs/submit.sh: the cluster refused this client's authentication. Clusters started with \`ray start\`" \
       "use token authentication: put the cluster's token in ~/.ray/auth_token (or RAY_AUTH_TOKEN) and run" \
       "again (RAY_AUTH_MODE=token is then set for you)." >&2
fi
[ "$code" -eq 0 ] && echo "job $name: ray job logs --address $RAY_ADDRESS --follow $name"
exit "$code"
