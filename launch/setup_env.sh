#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment with the pinned, tested stack.
#   UNCLIP_VENV=path      where the venv lives (default: .venv in the repo root)
#   UNCLIP_FRESH_VENV=1   delete it first (CI does this)
#   UNCLIP_EXTRAS=test    pip extras to install (default: test, which brings the PyTorch peers)
#   UNCLIP_TPU_COMPILER=0 with the test extra, skip libtpu (the abstract TPU compile tests then skip)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${UNCLIP_VENV:-$root/.venv}"
extras="${UNCLIP_EXTRAS-test}"
python="${UNCLIP_PYTHON:-python3}"

if [[ "${UNCLIP_FRESH_VENV:-0}" == "1" ]]; then
  rm -rf "$venv"
fi
if [[ ! -x "$venv/bin/python" ]]; then
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
fi
spec="$root"
[[ -n "$extras" ]] && spec="$root[$extras]"
# torch is pinned in the constraints so pip takes the CPU wheel and never a multi-GB CUDA build.
"$venv/bin/python" -m pip install -q -c "$root/requirements/constraints.txt" -e "$spec"
# The FID parity references (pytorch-fid, torch-fidelity, clean-fid) without their torchvision dependency, which
# does not import beside the pinned CPU torch; the tests load the torch-only modules they need.
if [[ ",$extras," == *",test,"* ]]; then
  "$venv/bin/python" -m pip install -q --no-deps -c "$root/requirements/constraints.txt" \
    -r "$root/requirements/fid-reference.txt"
fi
# libtpu (the tpu extra) for the compile-only TPU preflight tests: ~210 MB, CPU hosts never load it unless asked.
if [[ ",$extras," == *",test,"* && "${UNCLIP_TPU_COMPILER:-1}" == "1" ]]; then
  "$venv/bin/python" -m pip install -q -c "$root/requirements/constraints.txt" libtpu   # = setup.py's tpu extra
fi
echo "$venv"
