#!/usr/bin/env bash
# The prepared device check of issue #9 (bench/NOTES.md "Running on a GPU or TPU"): installs .whl/ (from
# bench/device_wheels.sh) next to the machine's own jax/torch, then runs the benchmarks into $OUT.
#   bash bench/device_run.sh main        # sample throughput vs diffusers at 1, 8, 32 + decoder train step (~9 min)
#   bash bench/device_run.sh ablations   # attention cuDNN vs XLA and sampler variants at batch 1; compile at 32
# BENCH_SIZE=tiny and PYTHON=... rehearse it on a CPU.
set -uo pipefail
mode="${1:-main}"
case "$mode" in main|ablations) ;; *) echo "usage: bench/device_run.sh main|ablations" >&2; exit 2 ;; esac
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-out}" size="${BENCH_SIZE:-karlo}" py="${PYTHON:-python3}"
mkdir -p "$out"
ls .whl/*.whl > /dev/null 2>&1 || { echo "no .whl/: run bench/device_wheels.sh and carry .whl" >&2; exit 1; }
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/device.csv" 2>&1
"$py" -c "import jax, jaxlib; print(jax.__version__, jaxlib.__version__, jax.devices())" > "$out/versions.txt" 2>&1
run() {   # run NAME SECONDS SCRIPT ARGS...: stdout+stderr to $out/NAME.md, JSON to $out/NAME.json
  local name=$1 limit=$2 script=$3; shift 3
  timeout "$limit" "$py" "bench/$script" --size "$size" "$@" --json "$out/$name.json" 2>&1 | tee "$out/$name.md"
}
if [[ $mode == main ]]; then
  run sample 400 sample_throughput.py --batch 1,8,32 --repeats 3
  run train 150 train_step.py --stages decoder --batch 32
else
  run ablations1 280 sample_throughput.py --batch 1 --ablations --no-peer --repeats 3
  run compile32 250 sample_throughput.py --batch 32 --compile-only
fi
