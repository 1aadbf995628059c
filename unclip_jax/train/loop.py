"""The training loop every stage shares: mesh, sharded init, AOT compile, steps, metrics, checkpoints.

A stage contributes a `Task` (`stages.<name>.make_task`: parameter init, loss, per-host batches); everything
else — sharding, the optimiser, EMA, non-finite skipping, resuming, preemption — is here, once.
"""
from __future__ import annotations

import contextlib
import io
import logging
import pathlib
import signal
import time

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from unclip_jax import paths
from unclip_jax.ckpt.manager import CheckpointManager, abstract_with_shardings
from unclip_jax.data.global_batch import to_global
from unclip_jax.inference.images import image_grid
from unclip_jax.parallel import mesh as mesh_lib, partitioning
from unclip_jax.stages.common import Task
from unclip_jax.train import optim
from unclip_jax.train.state import TrainState
from unclip_jax.train.step import make_train_step

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device, keyed by the exact `device_kind` jax reports (unknown kinds report no MFU).
# TPU v5p reports "TPU v5" and v5e "TPU v5 lite" (v6e: "TPU v6 lite"), so a substring match would confuse them.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v5p": 459e12, "TPU v5e": 197e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12,
              "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
              "NVIDIA H200": 989e12, "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12,
              "NVIDIA A100-PCIE-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12}
# GPU kinds carry memory/form-factor suffixes; these families match by prefix after the exact table.
_GPU_FAMILIES = (("NVIDIA H200", 989e12), ("NVIDIA H100", 989e12), ("NVIDIA A100", 312e12))


def peak_flops(device: jax.Device | str) -> float | None:
  """Dense bf16 peak FLOP/s of a device (or a device_kind string); None for unknown kinds (and CPUs)."""
  kind = device if isinstance(device, str) else getattr(device, "device_kind", "")
  kind = str(kind).strip()
  if kind in PEAK_FLOPS:
    return PEAK_FLOPS[kind]
  for prefix, flops in _GPU_FAMILIES:
    if kind.startswith(prefix):
      return flops
  return None


def state_shardings(abstract_state: TrainState, param_sh, mesh) -> TrainState:
  """Shardings for the whole state: params and EMA as `param_sh`; every optimiser-state leaf that stands for a
  parameter (Adam's moments, wherever optax nests them: partitioned, masked or multi-step states, with masked-out
  frozen params) follows that parameter's sharding, matched by key path and shape; everything else (counts,
  scalars) is replicated."""
  replicated = NamedSharding(mesh, P())
  paths = jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]
  by_path = {tuple(path): (leaf.shape, sh) for (path, leaf), sh in zip(paths, jax.tree.leaves(param_sh))}

  def opt_leaf(path, leaf):
    path = tuple(path)
    for i in range(len(path)):              # the longest suffix of the optimiser path that names a parameter
      hit = by_path.get(path[i:])
      if hit is not None and hit[0] == getattr(leaf, "shape", None):
        return hit[1]
    return replicated

  opt_sh = jax.tree_util.tree_map_with_path(opt_leaf, abstract_state.opt_state)
  return TrainState(step=replicated, params=param_sh, ema_params=param_sh, opt_state=opt_sh)


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step (then it checkpoints and exits)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    with contextlib.suppress(ValueError):         # not the main thread: no handler, no preemption saves
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    log.warning("SIGTERM received: checkpointing after this step")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class MetricsWriter:
  """Console (logging + progress bar) and TensorBoard event files; only process 0 writes."""

  def __init__(self, workdir: pathlib.Path, total_steps: int, start_step: int, enabled: bool = True):
    self.enabled = enabled and jax.process_index() == 0
    self._workdir = workdir
    self._tb = None
    self._bar = None
    if self.enabled:
      from tensorboardX import SummaryWriter
      from tqdm.auto import tqdm

      self._tb = SummaryWriter(str(workdir / "tensorboard"))
      self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    self._tb.flush()
    self._bar.set_postfix({k: f"{v:.4g}" for k, v in scalars.items() if k in ("loss", "grad_norm", "steps_per_s")})
    log.info("step %d: %s", step, ", ".join(f"{k}={v:.5g}" for k, v in sorted(scalars.items())))

  def write_images(self, step: int, name: str, images: np.ndarray) -> pathlib.Path | None:
    """images [N, H, W, 3] in [-1, 1] -> one grid PNG (and a TensorBoard image)."""
    if not self.enabled:
      return None
    from PIL import Image

    grid = image_grid(images)
    path = self._workdir / "samples" / f"{name}_{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    paths.write_bytes_atomic(path, buf.getvalue())         # one upload on gs://
    self._tb.add_image(name, grid, step, dataformats="HWC")
    self._tb.flush()
    log.info("step %d: wrote %s", step, path)
    return path

  def advance(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()


def _host(x) -> np.ndarray:
  """A (possibly multi-host sharded) array -> the full numpy value on every host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def run_evaluation(task: Task, params, step: int, writer: "MetricsWriter") -> dict[str, float]:
  """Runs `task.evaluate(params)` and writes its scalars and image grids; returns the scalars."""
  results = task.evaluate(params)
  scalars = {}
  for name, value in results.items():
    value = _host(value)
    if value.ndim == 4:
      writer.write_images(step, name, value)
    elif value.size == 1:
      scalars[f"eval/{name}"] = float(value.reshape(()))
    else:
      raise ValueError(f"evaluate() returned {name!r} with shape {value.shape}: expected a scalar or [N, H, W, 3]")
  if scalars:
    writer.write(step, scalars)
  return scalars


def train(cfg, workdir, task: Task, *, mesh=None, max_steps: int | None = None) -> TrainState:
  """Trains `task` to `cfg.num_train_steps` (or `max_steps` more steps), resuming from `workdir` if possible.

  Checkpoints every `cfg.ckpt_every` steps, at the end, and on SIGTERM. Returns the final state.
  """
  workdir = paths.check_reachable(workdir, "--workdir", write=True)   # before any compute; gs:// stays a URL
  if jax.process_index() == 0 or not paths.is_remote(workdir):
    workdir.mkdir(parents=True, exist_ok=True)
  mesh = mesh or mesh_lib.make_mesh(dict(cfg.mesh))
  rules = tuple(tuple(r) for r in cfg.axis_rules)
  tx = optim.make_optimizer(cfg)
  base_rng = jax.random.key(cfg.seed)
  init_rng, step_rng = jax.random.split(base_rng)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract_params = jax.eval_shape(task.init_params, init_rng)
    param_sh = partitioning.param_shardings(abstract_params, mesh, rules, min_bytes=cfg.fsdp_min_bytes)
    init_state = lambda rng: TrainState.create(nn.unbox(task.init_params(rng)), tx)
    abstract_state = jax.eval_shape(init_state, init_rng)
    state_sh = state_shardings(abstract_state, param_sh, mesh)

    mngr = CheckpointManager(workdir / "checkpoints", max_to_keep=cfg.keep_checkpoints)
    has_data_state = hasattr(task.data, "get_state") and hasattr(task.data, "set_state")
    if mngr.latest_step() is not None:          # the newest step that verifies; damaged ones are moved aside
      _, state, _, data_state = mngr.restore_good(abstract_with_shardings(abstract_state, state_sh))
      if has_data_state and data_state is not None:
        task.data.set_state(data_state)
      log.info("resumed from step %d", int(state.step))
    else:
      state = jax.jit(init_state, out_shardings=state_sh)(init_rng)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    replicated = partitioning.replicated_fraction(state.params, min_bytes=cfg.fsdp_min_bytes)
    log.info("%s: %.2fM parameters, %.1f%% of bytes in large replicated tensors, mesh %s", cfg.stage,
             n_params / 1e6, 100 * replicated, dict(mesh.shape))
    if mesh.shape["fsdp"] > 1:
      partitioning.assert_sufficiently_sharded(state.params, cfg.sharding_tolerance, min_bytes=cfg.fsdp_min_bytes)

    step_fn = make_train_step(task.loss_fn, tx, ema_decay=cfg.optim.ema_decay, grad_accum=int(cfg.optim.grad_accum),
                              lr_schedule=optim.learning_rate_schedule(cfg),
                              ema_warmup=bool(cfg.optim.ema_warmup))
    start = int(state.step)
    end = cfg.num_train_steps if max_steps is None else min(cfg.num_train_steps, start + max_steps)
    if start >= end:
      mngr.close()
      return state

    first = to_global(next(task.data), mesh)
    batch_sh = jax.tree.map(lambda x: x.sharding, first)
    replicated_sh = NamedSharding(mesh, P())
    jitted = jax.jit(step_fn, in_shardings=(state_sh, batch_sh, replicated_sh), out_shardings=(state_sh, None),
                     donate_argnums=0)
    t0 = time.perf_counter()
    compiled = jitted.lower(state, first, step_rng).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis() or {}
    flops = float(cost.get("flops", 0.0)) if isinstance(cost, dict) else 0.0
    log.info("train_step compiled in %.1fs; %.3g FLOP/step/device; memory: %s", compile_s, flops,
             compiled.memory_analysis())
    peak = peak_flops(jax.devices()[0])
    examples = task.examples_per_batch or int(next(iter(first.values())).shape[0])

    writer = MetricsWriter(workdir, end, start)
    batch, last_log, last_time = first, start, time.perf_counter()
    skipped, pending_skips = 0, []
    eval_every = int(cfg.eval_every)
    with _Preemption() as preemption:
      for step in range(start, end):
        state, metrics = compiled(state, batch, step_rng)
        pending_skips.append(metrics.pop("skipped"))       # a device scalar; read when logging (no sync here)
        writer.advance()
        done = step + 1
        if done % cfg.log_every == 0 or done == end or preemption.requested:
          metrics = jax.device_get(metrics)
          skipped += int(sum(int(x) for x in jax.device_get(pending_skips)))
          pending_skips = []
          now = time.perf_counter()
          rate = (done - last_log) / max(now - last_time, 1e-9)
          scalars = {k: float(v) for k, v in metrics.items()}
          scalars.update(steps_per_s=rate, examples_per_s=rate * examples, skipped_steps=float(skipped))
          if peak and flops:
            scalars["mfu"] = flops * rate / peak
          writer.write(done, scalars)
          last_log, last_time = done, now
        if task.evaluate is not None and eval_every > 0 and (done % eval_every == 0 or done == end):
          run_evaluation(task, state.ema_params, done, writer)
          last_time = time.perf_counter()
        if done % cfg.ckpt_every == 0 or done == end or preemption.requested:
          mngr.save(done, state, config=cfg.to_dict(), stage=cfg.stage,
                    data_state=task.data.get_state() if has_data_state else None)
        if preemption.requested:
          log.warning("stopping at step %d after SIGTERM (checkpoint saved)", done)
          break
        if done < end:
          batch = to_global(next(task.data), mesh)
    mngr.wait()
    mngr.close()
    writer.close()
  return state
