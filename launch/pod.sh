#!/usr/bin/env bash
# Runs the same command on every worker of a TPU slice (the repo must be at the same path on each worker).
#   GIT_URL=https://.../unclip_jax.git TPU_NAME=unclip-v5p ZONE=us-east5-a bash launch/pod.sh setup   # clone/refresh + venv
#   TPU_NAME=unclip-v5p ZONE=us-east5-a bash launch/pod.sh train --config=configs/decoder.py:karlo --workdir=gs://b/run
#   TPU_NAME=unclip-v5p ZONE=us-east5-a bash launch/pod.sh logs          # follow worker 0's training log
#   TPU_NAME=unclip-v5p ZONE=us-east5-a bash launch/pod.sh delete        # tear the slice (queued resource) down
# `train` runs detached on every worker (nohup, log in ~/unclip_train.log) so an ssh drop does not kill it.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
repo_dir="${REPO_DIR:-\$HOME/unclip_jax}"
what="${1:?usage: pod.sh setup|train ARGS...|logs|cmd 'shell command'|delete}"; shift
case "$what" in
  setup)   # GIT_URL=... clones the repo where it is missing; then the pinned venv + the TPU runtime for that jax
    cmd="{ [ -d $repo_dir ] || git clone ${GIT_URL:-MISSING_GIT_URL} $repo_dir; } && cd $repo_dir && git pull --ff-only"
    cmd+=" && UNCLIP_EXTRAS='' UNCLIP_PYTHON=python3.12 bash launch/setup_env.sh"
    cmd+=" && .venv/bin/pip install -q -c requirements/constraints.txt 'jax[tpu]'" ;;
  train) cmd="cd $repo_dir && nohup bash launch/run.sh $(printf '%q ' "$@") > \$HOME/unclip_train.log 2>&1 &" ;;
  cmd) cmd="cd $repo_dir && $*" ;;
  logs)
    exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" ${PROJECT:+--project "$PROJECT"} --zone "$ZONE" --worker=0 \
      --command "tail -n 200 -f \$HOME/unclip_train.log" ;;
  delete)
    exec gcloud compute tpus queued-resources delete "$TPU_NAME" ${PROJECT:+--project "$PROJECT"} --zone "$ZONE" \
      --force --quiet ;;
  *) echo "unknown action $what (setup|train|logs|cmd|delete)" >&2; exit 2 ;;
esac
gcloud compute tpus tpu-vm ssh "$TPU_NAME" ${PROJECT:+--project "$PROJECT"} --zone "$ZONE" --worker=all \
  --command "$cmd"
