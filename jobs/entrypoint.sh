#!/bin/sh
# The command `ray job submit` runs on the cluster (jobs/submit.sh): `sh jobs/entrypoint.sh PYTHON ARGS...`
# runs `PYTHON -m damoc ARGS...` once that interpreter is known to hold DaMoC's dependencies; otherwise it
# says which interpreter it found and how to point the job at the right one (exit 2).
py="$1"
shift
if ! "$py" -c "import ray, torch, transformers, peft, pandas, pydantic, yaml" 2>/dev/null; then
  echo "damoc: '$py' on the cluster ($(command -v "$py" || echo 'not found')) lacks DaMoC's dependencies." >&2
  echo "  Submit with the pip runtime env (cluster/runtime_env.yaml, the default), run the cluster on the image" >&2
  echo "  from cluster/Dockerfile, or name the cluster's interpreter: DAMOC_CLUSTER_PYTHON=/path/to/python jobs/submit.sh ..." >&2
  exit 2
fi
exec "$py" -m damoc "$@"
