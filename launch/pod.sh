#!/usr/bin/env bash
# Runs the same command on every worker of a TPU slice (the repo must be at the same path on each worker).
#   TPU_NAME=unclip-v5p ZONE=us-east5-a bash launch/pod.sh setup         # clone/refresh + venv on all workers
#   TPU_NAME=unclip-v5p ZONE=us-east5-a bash launch/pod.sh train --config=configs/decoder.py:karlo --workdir=gs://b/run
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
repo_dir="${REPO_DIR:-\$HOME/unclip_jax}"
what="${1:?usage: pod.sh setup|train ARGS...|cmd 'shell command'}"; shift
case "$what" in
  setup) cmd="cd $repo_dir && UNCLIP_EXTRAS='' UNCLIP_PYTHON=python3.12 bash launch/setup_env.sh && .venv/bin/pip install -q 'jax[tpu]'" ;;
  train) cmd="cd $repo_dir && bash launch/run.sh $(printf '%q ' "$@")" ;;
  cmd) cmd="cd $repo_dir && $*" ;;
  *) echo "unknown action $what (setup|train|cmd)" >&2; exit 2 ;;
esac
gcloud compute tpus tpu-vm ssh "$TPU_NAME" ${PROJECT:+--project "$PROJECT"} --zone "$ZONE" --worker=all \
  --command "$cmd"
