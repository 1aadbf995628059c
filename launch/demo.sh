#!/usr/bin/env bash
# The web demo: sets up the environment with the [demo] extra if needed, then `python -m unclip_jax.demo "$@"`
# (the embedded default model when no --bundle is given; http://127.0.0.1:7860 by default).
#   bash launch/demo.sh [--bundle B] [--host 127.0.0.1] [--port 7860]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${UNCLIP_VENV:-$root/.venv}"
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import unclip_jax, gradio" 2>/dev/null; then
  venv="$(UNCLIP_EXTRAS=demo bash "$root/launch/setup_env.sh" | tail -n 1)"
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$venv/bin/python" -m unclip_jax.demo "$@"
