#!/usr/bin/env bash
# The main job: sets up the environment if needed, then `python -m unclip_jax.sample "$@"`
# (the embedded default model when no --bundle is given).
#   bash launch/sample.sh --prompts-file launch/shapes_prompts.txt --out out/ --seed 0
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${UNCLIP_VENV:-$root/.venv}"
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import unclip_jax" 2>/dev/null; then
  venv="$(UNCLIP_EXTRAS='' bash "$root/launch/setup_env.sh" | tail -n 1)"
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$venv/bin/python" -m unclip_jax.sample "$@"
