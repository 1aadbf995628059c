"""Checkpoints: a thin wrapper over orbax's CheckpointManager (the only module that imports orbax).

A checkpoint step holds the train state (params, EMA, optimiser state, step), the config as JSON, a `meta`
JSON with versions and the checkpoint schema, and the data iterator's position as JSON (grain iterators'
`get_state()`, or null). Orbax writes each
step to a temporary directory and renames it when complete, so an interrupted save never leaves a partial
checkpoint that restore would pick up.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

import unclip_jax


def git_commit() -> str:
  """The repository's HEAD commit, or "unknown" outside a checkout."""
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                         cwd=pathlib.Path(__file__).resolve().parent)
    return out.stdout.strip() or "unknown"
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def version_stamp(stage: str) -> dict[str, Any]:
  """Versions of everything that shapes a checkpoint, stored beside it."""
  import flax
  import optax

  return dict(unclip_jax=unclip_jax.__version__, schema=unclip_jax.CHECKPOINT_SCHEMA, stage=stage,
              jax=jax.__version__, flax=flax.__version__, optax=optax.__version__, orbax=ocp.__version__,
              commit=git_commit())


class CheckpointManager:
  """Save/restore train states under `directory/<step>/`.

  Args:
    directory: where checkpoints live (created if missing).
    max_to_keep: keep the newest N steps.
    async_save: write in a background thread (call `wait()` before exiting).
  """

  def __init__(self, directory, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    names = ("state", "config", "meta", "data")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True)
    self._mngr = ocp.CheckpointManager(self.directory, item_names=names, options=options)

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state, *, config: dict, stage: str, data_state: dict | None = None,
           force: bool = False) -> bool:
    """Starts saving `state` at `step` (asynchronously by default). Every process must call it.

    `data_state` is the data iterator's JSON-serialisable position (e.g. a grain iterator's `get_state()`).
    """
    items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config),
                 meta=ocp.args.JsonSave(version_stamp(stage)), data=ocp.args.JsonSave({"state": data_state}))
    return self._mngr.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state, step: int | None = None):
    """Restores the state at `step` (default: latest) onto the shardings of `abstract_state`.

    `abstract_state` is a tree of `jax.ShapeDtypeStruct` (with `sharding=`), e.g. from `jax.eval_shape`.
    Returns (state, meta). Raises FileNotFoundError when there is no checkpoint and ValueError when the
    checkpoint's schema is newer than this code understands.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint found in {self.directory}")
    if step not in self.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} (have {self.all_steps()})")
    meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if int(meta.get("schema", -1)) > unclip_jax.CHECKPOINT_SCHEMA:
      raise ValueError(f"checkpoint {self.directory}/{step} has schema {meta.get('schema')}, newer than this "
                       f"unclip_jax ({unclip_jax.CHECKPOINT_SCHEMA}); upgrade unclip_jax")
    restored = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"], meta

  def restore_data_state(self, step: int | None = None):
    """The data iterator position saved with `step` (default: latest), or None."""
    step = self.latest_step() if step is None else step
    return self._mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]["state"]

  def restore_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return self._mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are committed."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.close()


def restore_params(directory, *, step: int | None = None, which: str = "ema_params"):
  """Parameters of a training run for sampling or export, without building its optimiser or model.

  Args:
    directory: a training workdir (with `checkpoints/`) or its `checkpoints/` directory.
    step: default latest; which: "ema_params" (what sampling uses) or "params".
  Returns:
    (params as a nested dict of host numpy arrays, the run's config dict, the checkpoint's meta dict with the
    restored `step` added).
  Raises:
    FileNotFoundError: no checkpoint there.  ValueError: unknown `which` or a newer checkpoint schema.
  """
  if which not in ("ema_params", "params"):
    raise ValueError(f"which must be 'ema_params' or 'params', got {which!r}")
  directory = pathlib.Path(directory).absolute()          # orbax wants absolute paths
  if (directory / "checkpoints").is_dir():
    directory = directory / "checkpoints"
  if not directory.is_dir():
    raise FileNotFoundError(f"no checkpoint directory at {directory}")
  mngr = CheckpointManager(directory, async_save=False)
  try:
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
      raise FileNotFoundError(f"no checkpoint {'' if step is None else f'for step {step} '}in {directory}")
    items = mngr._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(),
                                                             config=ocp.args.JsonRestore()))
    meta, config = items["meta"], items["config"]
    if int(meta.get("schema", -1)) > unclip_jax.CHECKPOINT_SCHEMA:
      raise ValueError(f"checkpoint {directory}/{step} has schema {meta.get('schema')}, newer than this "
                       f"unclip_jax ({unclip_jax.CHECKPOINT_SCHEMA}); upgrade unclip_jax")
    path = directory / str(step) / "state"
    raw = ocp.PyTreeCheckpointer().restore(path, restore_args=None)
  finally:
    mngr.close()
  if which not in raw:
    raise ValueError(f"checkpoint {path} has no {which!r} (items: {sorted(raw)})")
  return jax.tree.map(lambda x: np.asarray(x), raw[which]), config, dict(meta, step=step)


def abstract_with_shardings(tree, shardings=None):
  """ShapeDtypeStructs of `tree` (arrays or abstract values) carrying `shardings` (default: their own)."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def describe(directory) -> str:
  """A one-line summary of the checkpoints in `directory` (for logs)."""
  steps = sorted(int(p.name) for p in pathlib.Path(directory).iterdir() if p.name.isdigit())
  return json.dumps({"directory": str(directory), "steps": steps})
