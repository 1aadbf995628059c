#!/usr/bin/env bash
# Creates a Cloud TPU VM slice through a queued resource and waits until it is ACTIVE.
#   TPU_NAME=unclip-v5p ZONE=us-east5-a ACCELERATOR=v5p-64 RUNTIME=v2-alpha-tpuv5 PROJECT=my-proj bash launch/create_tpu.sh
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${ACCELERATOR:?set ACCELERATOR (e.g. v5p-64)}"
: "${RUNTIME:?set RUNTIME (the TPU software version for the accelerator)}"
project_args=()
[[ -n "${PROJECT:-}" ]] && project_args=(--project "$PROJECT")
gcloud compute tpus queued-resources create "$TPU_NAME" "${project_args[@]}" --zone "$ZONE" \
  --node-id "$TPU_NAME" --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME" ${SPOT:+--spot}
until [[ "$(gcloud compute tpus queued-resources describe "$TPU_NAME" "${project_args[@]}" --zone "$ZONE" \
          --format='value(state.state)')" == "ACTIVE" ]]; do
  echo "waiting for $TPU_NAME ..."; sleep 30
done
echo "$TPU_NAME is ACTIVE"
