#!/usr/bin/env bash
# Multi-process launcher for GPU machines: one training process per GPU, on one node or several.
#   single node, all GPUs:   bash launch/gpu.sh --config=configs/decoder.py:karlo --workdir=/ckpt/decoder
#   node r of N:             NNODES=N NODE_RANK=r COORDINATOR=node0:12355 bash launch/gpu.sh --config=... --workdir=...
#   (SLURM: `srun` one task per GPU running `bash launch/run.sh ...` instead; jax detects SLURM by itself.)
#   batch sampling:          UNCLIP_MODULE=unclip_jax.sample LOG_DIR=out/logs bash launch/gpu.sh --prompts-file p.txt --out out/
# Env: NPROC (processes on this node; default: number of GPUs from nvidia-smi), LOG_DIR (default WORKDIR/logs;
#      ./logs when WORKDIR is a URL such as gs://bucket/run: the process logs are local files),
#      UNCLIP_LAUNCH_CPU=1 to run the same topology on CPU devices (used by the tests; 4 devices per process).
# Process i of this node gets JAX_PROCESS_ID=NODE_RANK*NPROC+i and sees only GPU i (JAX_LOCAL_DEVICE_IDS=i).
# Every process's output goes to LOG_DIR/process_<id>.log; process 0's is also shown here. If one process fails,
# the others are stopped and the launcher exits with its status.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nnodes="${NNODES:-1}"; node_rank="${NODE_RANK:-0}"
if [[ -n "${UNCLIP_LAUNCH_CPU:-}" ]]; then
  nproc="${NPROC:-2}"
else
  nproc="${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
fi
(( nproc >= 1 )) || { echo "gpu.sh: no GPUs found (set NPROC, or UNCLIP_LAUNCH_CPU=1)" >&2; exit 2; }
coordinator="${COORDINATOR:-127.0.0.1:$(( 20000 + RANDOM % 20000 ))}"
(( nnodes == 1 )) || [[ -n "${COORDINATOR:-}" ]] || { echo "gpu.sh: NNODES>1 needs COORDINATOR=host:port" >&2; exit 2; }
workdir=""
for arg in "$@"; do [[ "$arg" == --workdir=* ]] && workdir="${arg#--workdir=}"; [[ "$arg" == --out=* ]] && workdir="${arg#--out=}"; done
if [[ "$workdir" == *://* ]]; then log_dir="${LOG_DIR:-logs}"; else log_dir="${LOG_DIR:-${workdir:-.}/logs}"; fi
mkdir -p "$log_dir"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; }
trap 'cleanup; exit 130' INT TERM
for (( i = 0; i < nproc; i++ )); do
  id=$(( node_rank * nproc + i ))
  env_vars=(JAX_COORDINATOR_ADDRESS="$coordinator" JAX_NUM_PROCESSES=$(( nnodes * nproc )) JAX_PROCESS_ID="$id")
  if [[ -n "${UNCLIP_LAUNCH_CPU:-}" ]]; then
    env_vars+=(JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${CPU_DEVICES:-4}")
  else
    env_vars+=(JAX_LOCAL_DEVICE_IDS="$i")
  fi
  env "${env_vars[@]}" bash "$root/launch/run.sh" --distributed=on "$@" > "$log_dir/process_$id.log" 2>&1 &
  pids+=($!)
done
[[ "$node_rank" == 0 ]] && tail -n +1 -f "$log_dir/process_0.log" --pid "${pids[0]}" &
status=0
for p in "${pids[@]}"; do
  wait "$p"; rc=$?
  if (( rc != 0 )); then
    (( status == 0 )) && status=$rc
    echo "gpu.sh: a process exited with status $rc; stopping the others (logs in $log_dir)" >&2
    cleanup
  fi
done
wait 2>/dev/null
exit "$status"
