"""jax.distributed for the command-line tools: detection of multi-host launchers, initialisation, barriers."""
from __future__ import annotations

import logging
import os

_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def multihost_detected() -> bool:
  """launch/gpu.sh (JAX_COORDINATOR_ADDRESS), a multi-worker TPU slice, SLURM or Open MPI with > 1 task."""
  if any("," in os.environ.get(name, "") or name == "JAX_COORDINATOR_ADDRESS" and os.environ.get(name)
         for name in _MULTIHOST_ENV):
    return True
  return int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def initialize() -> None:
  """jax.distributed.initialize(): cluster auto-detection, or the explicit JAX_COORDINATOR_ADDRESS +
  JAX_NUM_PROCESSES + JAX_PROCESS_ID (+ JAX_LOCAL_DEVICE_IDS) that launch/gpu.sh sets; gloo collectives on CPU."""
  import jax

  kwargs = {}
  if os.environ.get("JAX_NUM_PROCESSES") and os.environ.get("JAX_PROCESS_ID"):
    kwargs = dict(num_processes=int(os.environ["JAX_NUM_PROCESSES"]), process_id=int(os.environ["JAX_PROCESS_ID"]))
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def maybe_initialize(mode: str) -> None:
  """mode 'on' | 'off' | 'auto' (initialise when `multihost_detected`)."""
  if mode == "on" or (mode == "auto" and multihost_detected()):
    initialize()


def barrier(name: str) -> None:
  """Waits for every process (a no-op in a single-process run)."""
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
