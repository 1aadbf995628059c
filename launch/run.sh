#!/usr/bin/env bash
# Per-host entry point: the same on a laptop, a GPU box or every worker of a TPU pod.
#   bash launch/run.sh --config=configs/prior.py:tiny --workdir=/tmp/prior
# On multi-host platforms the trainer calls jax.distributed.initialize() itself (UNCLIP_DISTRIBUTED=auto).
# UNCLIP_MODULE=unclip_jax.sample runs the sampler instead (batch sampling split across every process).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${UNCLIP_VENV:-$root/.venv}"
[[ -x "$venv/bin/python" ]] || venv="$(UNCLIP_EXTRAS='' bash "$root/launch/setup_env.sh" | tail -n 1)"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
exec "$venv/bin/python" -m "${UNCLIP_MODULE:-unclip_jax.train}" "$@"
