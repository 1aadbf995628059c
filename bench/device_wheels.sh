#!/usr/bin/env bash
# Builds .whl/: the wheels a GPU machine with jax, flax, optax, orbax, transformers and torch (but not the rest of
# our stack) needs to run bench/ for CPython 3.12 on x86_64. Checked on 2026-12-01 in a bare 3.12 venv with only
# jax, flax, optax, orbax-checkpoint, transformers, numpy, pillow and safetensors installed: with these on
# PYTHONPATH both benchmarks import and compile every stage. 14 wheels, ~17 MB (a device call carries 64 MiB).
#   bash bench/device_wheels.sh [DIR]       (default .whl at the repository root; git ignores it)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${1:-$root/.whl}"
mkdir -p "$dir"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$dir" diffusers==0.42.1 ml_collections==1.1.0 grain==0.2.18 \
  array_record==0.8.6 tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 \
  immutabledict==4.3.1 toml==0.10.2 portpicker==1.6.0 cloudpickle==3.1.3 six==1.17.0 wrapt==2.5.2
python3 -m pip wheel -q --no-deps promise==2.3 -w "$dir"      # tfds needs it; PyPI has only its sdist
ls "$dir"
