"""Checkpoints: a thin wrapper over orbax's CheckpointManager (the only module that imports orbax).

A checkpoint step holds the train state (params, EMA, optimiser state, step), the config as JSON, a `meta`
JSON with versions and the checkpoint schema, and the data iterator's position as JSON (grain iterators'
`get_state()`, or null). Orbax writes each
step to a temporary directory and renames it when complete, so an interrupted save never leaves a partial
checkpoint that restore would pick up.

Integrity: once orbax has committed a step (at the next save, `wait()` or `close()`), process 0 writes
`<step>/integrity.json` with the size and sha256 of every file of the step (`unclip_jax.ckpt.integrity`).
`restore_good` checks a step against it before restoring; a damaged step (a changed, truncated or missing file, or
a restore error) is moved to `<directory>/damaged/` and the next older step is tried. Retention is done here, not
by orbax: old steps are deleted only after a newer step's record is written, so the newest recorded step is never
the one deleted.
"""
from __future__ import annotations

import json
import logging
import pathlib
import subprocess
import time
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

import unclip_jax
from unclip_jax import paths
from unclip_jax.ckpt import integrity

log = logging.getLogger(__name__)
DAMAGED_DIR = "damaged"


class NewerSchemaError(ValueError):
  """The checkpoint was written by a newer unclip_jax (not damage: upgrade instead)."""


class DamagedCheckpointError(ValueError):
  """A checkpoint step is damaged: `step`, `path` (the file, relative to the step) and `problem` say how."""

  def __init__(self, directory, step: int, problem: str, path: str = ""):
    super().__init__(f"checkpoint step {step} in {directory} is damaged ({problem})")
    self.step, self.problem, self.path = step, problem, path


class NoGoodCheckpointError(RuntimeError):
  """Every checkpoint step of a directory is damaged; the message names each step and its problem."""


class Restored(NamedTuple):
  """What `CheckpointManager.restore_good` returns."""
  step: int
  state: Any
  meta: dict
  data_state: Any


def _check_schema(meta: dict, where: str) -> None:
  if int(meta.get("schema", -1)) > unclip_jax.CHECKPOINT_SCHEMA:
    raise NewerSchemaError(f"checkpoint {where} has schema {meta.get('schema')}, newer than this unclip_jax "
                           f"({unclip_jax.CHECKPOINT_SCHEMA}); upgrade unclip_jax")


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _any_process(flag: bool) -> bool:
  """True when `flag` is true on any process (every process must call it; one process: `flag`)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


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
  """Save/restore train states under `directory/<step>/`, each step with an integrity record.

  Args:
    directory: where checkpoints live (created if missing).
    max_to_keep: keep the newest N steps (None: all). A step is deleted only after a newer step's record is written.
    async_save: write in a background thread (call `wait()` before exiting).
  """

  def __init__(self, directory, *, max_to_keep: int | None = 3, async_save: bool = True):
    self.directory = paths.as_path(directory, absolute=True)      # orbax wants absolute paths; gs:// as is
    names = ("state", "config", "meta", "data")
    options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=async_save, create=True)
    self._mngr = ocp.CheckpointManager(epath.Path(self.directory), item_names=names, options=options)
    self._keep = max_to_keep
    self._async = async_save
    self._unrecorded: list[int] = []         # steps saved here whose integrity record is not written yet

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def step_dir(self, step: int) -> epath.Path:
    return epath.Path(self.directory) / str(step)

  def save(self, step: int, state, *, config: dict, stage: str, data_state: dict | None = None,
           force: bool = False) -> bool:
    """Starts saving `state` at `step` (asynchronously by default). Every process must call it.

    `data_state` is the data iterator's JSON-serialisable position (e.g. a grain iterator's `get_state()`). The
    previous step's integrity record is written first (orbax waits for that save here anyway).
    """
    self._record_pending()
    items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config),
                 meta=ocp.args.JsonSave(version_stamp(stage)), data=ocp.args.JsonSave({"state": data_state}))
    saved = self._mngr.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      self._unrecorded.append(step)
      if not self._async:
        self._record_pending()
    return saved

  def _record_pending(self) -> None:
    """Waits for orbax's commit of the steps saved here, writes their integrity records (process 0), then
    deletes steps beyond `max_to_keep`."""
    if not self._unrecorded:
      return
    self._mngr.wait_until_finished()
    for step in self._unrecorded:
      if jax.process_index() == 0 and self.step_dir(step).is_dir():
        t0 = time.perf_counter()
        record = integrity.write_record(self.step_dir(step), step=step)
        size = sum(f["size"] for f in record["files"].values())
        log.info("checkpoint step %d: integrity record of %d files (%.1f MB) in %.2fs", step, len(record["files"]),
                 size / 1e6, time.perf_counter() - t0)
    self._unrecorded = []
    _sync("unclip_jax:integrity_records")
    self._prune()

  def _prune(self) -> None:
    """Deletes the oldest steps beyond `max_to_keep`, never the newest step that has an integrity record."""
    if self._keep is None:
      return
    steps = sorted(self.all_steps())
    recorded = [s for s in steps if (self.step_dir(s) / integrity.RECORD_NAME).exists()]
    keep = set(steps[-max(int(self._keep), 1):]) | set(recorded[-1:])
    for step in steps:
      if step not in keep:
        self._mngr.delete(step)

  def verify(self, step: int) -> bool:
    """Checks step `step` against its integrity record: True when verified, False when it has none; raises
    DamagedCheckpointError naming the file otherwise."""
    if not self.step_dir(step).is_dir():
      raise DamagedCheckpointError(self.directory, step, f"{self.step_dir(step)} is missing")
    try:
      return integrity.verify(self.step_dir(step))
    except (integrity.IntegrityError, OSError) as e:
      raise DamagedCheckpointError(self.directory, step, str(e), getattr(e, "path", "")) from e

  def restore(self, abstract_state, step: int | None = None, *, verify: bool = True):
    """Restores the state at `step` (default: latest) onto the shardings of `abstract_state`.

    `abstract_state` is a tree of `jax.ShapeDtypeStruct` (with `sharding=`), e.g. from `jax.eval_shape`.
    Returns (state, meta). Raises FileNotFoundError when there is no checkpoint, DamagedCheckpointError when a file
    differs from the step's integrity record (`verify=True`) and NewerSchemaError (a ValueError) when the
    checkpoint's schema is newer than this code understands.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint found in {self.directory}")
    if step not in self.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} (have {self.all_steps()})")
    if verify:
      self.verify(step)
    meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    _check_schema(meta, f"{self.directory}/{step}")
    restored = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"], meta

  def restore_good(self, abstract_state) -> Restored:
    """Restores the newest good step: state (onto `abstract_state`'s shardings), meta and data iterator state.

    Each step, newest first, is checked against its integrity record and then restored. A damaged one (a changed,
    truncated or missing file, or a restore error) is logged in one line naming the step and the file, moved to
    `<directory>/damaged/<step>.<UTC time>` (never deleted) and the next older step is tried. A step without a
    record (older code, or stopped between orbax's commit and the record) is accepted if it restores, with a log
    line. Every process checks what it reads; process 0 moves steps aside. Raises FileNotFoundError when there is
    no checkpoint and NoGoodCheckpointError when every step is damaged.
    """
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint found in {self.directory}")
    problems = []
    for k, step in enumerate(steps):
      problem, verified = None, False
      try:
        verified = self.verify(step)
      except DamagedCheckpointError as e:
        problem = e.problem
      if _any_process(problem is not None):
        problem = problem or "damaged as read by another process"
      else:
        try:
          meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
          _check_schema(meta, f"{self.directory}/{step}")
          items = self._mngr.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
          result = Restored(step, items["state"], meta, items["data"]["state"])
        except NewerSchemaError:
          raise
        except Exception as e:  # noqa: BLE001 - any failure to read a step is damage; the message names it
          problem = f"restore failed: {_first_line(e)}"
        if _any_process(problem is not None):
          problem = problem or "restore failed on another process"
        else:
          if not verified:
            log.warning("checkpoint step %d in %s has no integrity record (written by older code, or stopped "
                        "before its record); accepted because it restores", step, self.directory)
          return result
      moved = self._move_aside(step)
      then = f"falling back to step {steps[k + 1]}" if k + 1 < len(steps) else "no older step left"
      log.error("checkpoint step %d is damaged (%s); moved to %s; %s", step, problem, moved, then)
      problems.append(f"step {step}: {problem} (moved to {moved})")
    raise NoGoodCheckpointError(f"no good checkpoint in {self.directory}: every step is damaged; "
                                + "; ".join(problems))

  def _move_aside(self, step: int) -> epath.Path:
    """Renames `<directory>/<step>` to `<directory>/damaged/<step>.<UTC time>` (process 0); orbax stops listing it.

    On object storage (no rename) the step is copied there and then deleted.
    """
    now = int(time.time())
    if jax.process_count() > 1:              # one name on every process: process 0's clock
      from jax.experimental import multihost_utils

      now = int(multihost_utils.broadcast_one_to_all(np.asarray(now, np.int64)))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    dest = epath.Path(self.directory) / DAMAGED_DIR / f"{step}.{stamp}"
    n = 1
    while dest.exists():
      dest, n = epath.Path(self.directory) / DAMAGED_DIR / f"{step}.{stamp}.{n}", n + 1
    _sync(f"unclip_jax:move_aside_named:{step}")      # every process has chosen `dest` before it exists
    if jax.process_index() == 0:
      dest.parent.mkdir(parents=True, exist_ok=True)
      paths.move_tree(self.step_dir(step), dest)
    _sync(f"unclip_jax:move_aside_done:{step}")
    self._mngr.reload()
    return dest

  def restore_data_state(self, step: int | None = None):
    """The data iterator position saved with `step` (default: latest), or None."""
    step = self.latest_step() if step is None else step
    return self._mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]["state"]

  def restore_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return self._mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are committed and their integrity records written."""
    self._mngr.wait_until_finished()
    self._record_pending()

  def close(self) -> None:
    self._record_pending()
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
    DamagedCheckpointError (a ValueError): a file of the step differs from its integrity record (names it).
  """
  if which not in ("ema_params", "params"):
    raise ValueError(f"which must be 'ema_params' or 'params', got {which!r}")
  directory = paths.as_path(directory, absolute=True)     # orbax wants absolute paths; gs:// as is
  if (directory / "checkpoints").is_dir():
    directory = directory / "checkpoints"
  if not directory.is_dir():
    raise FileNotFoundError(f"no checkpoint directory at {directory}")
  mngr = CheckpointManager(directory, async_save=False)
  try:
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
      raise FileNotFoundError(f"no checkpoint {'' if step is None else f'for step {step} '}in {directory}")
    mngr.verify(step)
    items = mngr._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(),
                                                             config=ocp.args.JsonRestore()))
    meta, config = items["meta"], items["config"]
    _check_schema(meta, f"{directory}/{step}")
    path = directory / str(step) / "state"
    raw = ocp.PyTreeCheckpointer().restore(epath.Path(path), restore_args=None)
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
  steps = sorted(int(p.name) for p in paths.as_path(directory).iterdir() if p.name.isdigit())
  return json.dumps({"directory": str(directory), "steps": steps})
