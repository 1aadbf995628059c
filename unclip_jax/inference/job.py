"""A resumable, multi-host batch sampling job (what `python -m unclip_jax.sample` runs for text to image).

  rows      (p, k) for every prompt p and image k < images_per_prompt, prompt-major; row r is output number r
  units     consecutive runs of `shard_size` rows (png: shard_size = batch_size); unit u belongs to process
            u % process_count, so every row is sampled by exactly one host
  batches   a unit's rows not yet recorded, in contiguous runs cut into batches of ≤ `batch_size` (each padded to
            batch_size by the sampler: one compile per job)

Finished work is recorded as it is written, atomically (write to a temporary name, then rename; on gs:// one upload
per object; OUT may be a gs:// URL), by row range [a, b): png format writes OUT/0000.png + 0000.json per row, then
OUT/.done/<a>-<b>.json; webdataset format stages each batch as OUT/.partial/<unit>/<a>-<b>.tar and packs the unit
into OUT/shard-000000.tar when it is complete. So a rerun skips exactly the recorded rows whatever batch size either
run used (with batch-invariant sampling the batch size does not change the images, and `sample.py` then leaves it
out of the manifest's hash). OUT/manifest.json holds a hash of everything that decides the images (model, settings,
seed, prompts, layout); a rerun into the same folder skips the recorded work, and a rerun with other settings is
refused. SIGTERM finishes the batch in flight, records it and exits with PREEMPTED_EXIT_CODE (143), as training does.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import pathlib
import signal
import tarfile
import time
from typing import Any, Callable, Iterator

import numpy as np

from unclip_jax import paths
from unclip_jax.inference.prompt_sets import PromptSet

log = logging.getLogger(__name__)
PREEMPTED_EXIT_CODE = 143
FORMATS = ("png", "webdataset")
MANIFEST = "manifest.json"
SUMMARY = "summary.json"


# ---- file writes: local folders or gs:// (OUT is a `paths.as_path`: pathlib.Path or etils.epath.Path) ------------
def write_atomic(path, data: bytes) -> None:
  """Writes `data` to `path` atomically (a temporary sibling and a rename; on gs:// one upload of the object)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  paths.write_bytes_atomic(path, data)


def png_bytes(image: np.ndarray) -> bytes:
  from PIL import Image

  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size, info.mtime, info.mode = len(data), 0, 0o644
      tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def tar_members(path) -> list[tuple[str, bytes]]:
  with tarfile.open(fileobj=io.BytesIO(paths.as_path(path).read_bytes())) as tar:
    return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


# ---- the plan -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Plan:
  """rows: [(prompt index, k)] prompt-major; unit u = rows[u·shard_size : (u+1)·shard_size]."""
  prompts: PromptSet
  images_per_prompt: int
  batch_size: int
  shard_size: int

  def __post_init__(self):
    for name in ("images_per_prompt", "batch_size", "shard_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    self.rows = [(p, k) for p in range(len(self.prompts.captions)) for k in range(self.images_per_prompt)]

  @property
  def num_units(self) -> int:
    return -(-len(self.rows) // self.shard_size)

  def unit_rows(self, u: int) -> range:
    return range(u * self.shard_size, min((u + 1) * self.shard_size, len(self.rows)))

  def batches(self, u: int, done: frozenset[int] = frozenset()) -> list[range]:
    """Unit u's rows not in `done`, as contiguous ranges of ≤ batch_size rows."""
    out, run = [], [r for r in self.unit_rows(u) if r not in done]
    while run:
      n = 1
      while n < min(len(run), self.batch_size) and run[n] == run[0] + n:
        n += 1
      out.append(range(run[0], run[0] + n))
      run = run[n:]
    return out

  def units_of(self, process: int, count: int) -> list[int]:
    return list(range(process, self.num_units, count))


def settings_hash(record: dict) -> str:
  return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def check_manifest(out: pathlib.Path, manifest: dict, *, write: bool) -> None:
  """Refuses an output folder whose manifest records other settings; writes ours when absent (process 0)."""
  path = out / MANIFEST
  if path.exists():
    old = json.loads(path.read_text())
    if old.get("hash") != manifest["hash"]:
      diff = sorted(k for k in set(old.get("record", {})) | set(manifest["record"])
                    if old.get("record", {}).get(k) != manifest["record"].get(k))
      raise ValueError(f"{out} holds a sampling run with other settings (differs in {diff}); use a new --out, or "
                       f"rerun with the same settings to resume it")
  elif write:
    write_atomic(path, json.dumps(manifest, indent=1, default=str).encode())


class Preemption:
  """SIGTERM -> a flag checked after each batch (the batch in flight is finished and recorded first)."""

  def __init__(self):
    self.requested = False

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    log.warning("SIGTERM received: recording the batch in flight, then exiting")
    self.requested = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)


# ---- running ------------------------------------------------------------------------------------------------------
def row_name(r: int) -> str:
  return f"{r:04d}"


def wds_key(prompts: PromptSet, p: int, k: int) -> str:
  safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in prompts.ids[p])
  return f"{safe}_{k}"


SampleFn = Callable[[list[str], list[int], list[int]], Any]   # (captions, prompt idx, k) -> batch.Rows


@dataclasses.dataclass
class Job:
  """One process's share of a sampling run. `sample(captions, prompt_index, k)` -> `batch.Rows` for ≤ batch_size
  rows; `meta` goes into every image's JSON; `devices` is this process's device count (for the summary)."""
  out: pathlib.Path
  plan: Plan
  sample: SampleFn
  meta: dict
  fmt: str = "png"
  process: int = 0
  process_count: int = 1
  devices: int = 1
  barrier: Callable[[str], None] = lambda name: None
  progress: bool = True
  grid: bool = True
  grid_limit: int = 256

  def __post_init__(self):
    self._png_done: frozenset[int] | None = None

  def _done_marker(self, rows: range) -> pathlib.Path:
    return self.out / ".done" / f"{rows.start:08d}-{rows.stop:08d}.json"

  def _shard(self, u: int) -> pathlib.Path:
    return self.out / f"shard-{u:06d}.tar"

  def _partial_dir(self, u: int) -> pathlib.Path:
    return self.out / ".partial" / f"{u:06d}"

  def _partial(self, u: int, rows: range) -> pathlib.Path:
    return self._partial_dir(u) / f"{rows.start:08d}-{rows.stop:08d}.tar"

  @staticmethod
  def _ranges(folder: pathlib.Path, suffix: str) -> list[range]:
    """The row ranges named by folder/<a>-<b><suffix> files (recorded batches)."""
    out = []
    for f in sorted(folder.glob(f"*{suffix}")) if folder.is_dir() else []:
      a, _, b = f.name[:-len(suffix)].partition("-")
      if a.isdigit() and b.isdigit():
        out.append(range(int(a), int(b)))
    return out

  def unit_done(self, u: int) -> frozenset[int]:
    """Rows of unit u already recorded (by any process, with any batch size)."""
    rows = self.plan.unit_rows(u)
    if self.fmt == "webdataset":
      if self._shard(u).exists():
        return frozenset(rows)
      done = frozenset(r for rng in self._ranges(self._partial_dir(u), ".tar") for r in rng)
    else:
      if self._png_done is None:
        self._scan_done()
      done = self._png_done
    return frozenset(r for r in rows if r in done)

  def _scan_done(self) -> None:
    """Reads the png run's .done/ markers (their ranges may cross this run's units: png units are only a split)."""
    self._png_done = frozenset(r for rng in self._ranges(self.out / ".done", ".json") for r in rng)

  def rows_done(self) -> int:
    """Rows of the whole run already recorded (any process)."""
    self._scan_done()
    return sum(len(self.unit_done(u)) for u in range(self.plan.num_units))

  def _metas(self, rows: range, result) -> list[dict]:
    out = []
    for r, score in zip(rows, result.clip_scores):
      p, k = self.plan.rows[r]
      out.append(dict(self.meta, index=r, prompt=self.plan.prompts.captions[p], prompt_index=p,
                      prompt_id=self.plan.prompts.ids[p], k=k, clip_score=score))
    return out

  def _write_batch(self, u: int, rows: range, result) -> None:
    metas = self._metas(rows, result)
    if self.fmt == "webdataset":
      members = []
      for r, image, meta in zip(rows, result.images, metas):
        key = wds_key(self.plan.prompts, *self.plan.rows[r])
        members += [(f"{key}.png", png_bytes(image)), (f"{key}.json", json.dumps(meta, default=str).encode())]
      write_atomic(self._partial(u, rows), tar_bytes(members))
      return
    for r, image, meta in zip(rows, result.images, metas):
      write_atomic(self.out / f"{row_name(r)}.png", png_bytes(image))
      write_atomic(self.out / f"{row_name(r)}.json", json.dumps(meta, indent=1, default=str).encode())
    write_atomic(self._done_marker(rows), json.dumps({"rows": [rows.start, rows.stop]}).encode())

  def _finish_unit(self, u: int) -> None:
    if self.fmt != "webdataset" or self._shard(u).exists():
      return
    staged = sorted(self._ranges(self._partial_dir(u), ".tar"), key=lambda rng: rng.start)
    if [r for rng in staged for r in rng] != list(self.plan.unit_rows(u)):
      raise RuntimeError(f"unit {u}: its staged batches in {self._partial_dir(u)} do not cover rows "
                         f"{self.plan.unit_rows(u)} exactly once")
    parts = [self._partial(u, rng) for rng in staged]
    members = [m for part in parts for m in tar_members(part)]
    write_atomic(self._shard(u), tar_bytes(members))
    for part in parts:
      part.unlink()
    if not paths.is_remote(parts[0]):              # object stores have no empty folders to remove
      try:
        parts[0].parent.rmdir()
      except OSError:
        pass

  def _progress_file(self, process: int) -> pathlib.Path:
    return self.out / ".progress" / f"process_{process:05d}.json"

  def _report(self, images: int, seconds: float) -> None:
    write_atomic(self._progress_file(self.process), json.dumps(
        {"images": images, "seconds": seconds, "devices": self.devices}).encode())

  def _others(self) -> int:
    n = 0
    for i in range(self.process_count):
      if i != self.process and self._progress_file(i).exists():
        try:
          n += json.loads(self._progress_file(i).read_text())["images"]
        except (ValueError, KeyError):
          pass
    return n

  def run(self) -> int:
    """Samples this process's pending batches; returns 0, or PREEMPTED_EXIT_CODE after SIGTERM."""
    from tqdm.auto import tqdm

    self.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    already = self.rows_done()
    self.barrier("unclip_sample_start")              # every process has seen the same finished work
    self._report(0, 0.0)
    bar = tqdm(total=len(self.plan.rows), initial=already, desc="images", unit="img", smoothing=0.1,
               disable=not self.progress or self.process != 0, dynamic_ncols=True)
    made = 0
    with Preemption() as stop:
      for u in self.plan.units_of(self.process, self.process_count):
        if self.fmt == "webdataset" and self._shard(u).exists():
          continue
        for rows in self.plan.batches(u, self.unit_done(u)):
          p = [self.plan.rows[r][0] for r in rows]
          result = self.sample([self.plan.prompts.captions[i] for i in p], p, [self.plan.rows[r][1] for r in rows])
          self._write_batch(u, rows, result)
          made += len(rows)
          self._report(made, time.perf_counter() - start)
          bar.n = min(already + made + self._others(), len(self.plan.rows))
          bar.refresh()
          if stop.requested:
            bar.close()
            log.warning("preempted: %d images recorded this run; rerun the same command to resume", made)
            return PREEMPTED_EXIT_CODE
        self._finish_unit(u)
    bar.close()
    self._report(made, time.perf_counter() - start)
    self.barrier("unclip_sample_end")
    if self.process == 0:
      self._summary(time.perf_counter() - start)    # the job's wall time: until the slowest process is done
    return 0

  def _summary(self, seconds: float) -> dict:
    reports = [json.loads(self._progress_file(i).read_text()) for i in range(self.process_count)
               if self._progress_file(i).exists()]
    made = sum(r["images"] for r in reports)
    devices = sum(r["devices"] for r in reports)
    summary = dict(images=len(self.plan.rows), images_this_run=made, seconds=round(seconds, 3),
                   images_per_s=made / seconds if seconds > 0 else None,
                   images_per_s_per_device=made / seconds / max(devices, 1) if seconds > 0 else None,
                   processes=self.process_count, devices=devices, format=self.fmt,
                   per_process=reports)
    write_atomic(self.out / SUMMARY, json.dumps(summary, indent=1).encode())
    if self.fmt == "png" and self.grid and len(self.plan.rows) <= self.grid_limit:
      self._grid()
    return summary

  def _grid(self) -> None:
    from PIL import Image

    from unclip_jax.inference.images import image_grid

    images = np.stack([np.asarray(Image.open(io.BytesIO((self.out / f"{row_name(r)}.png").read_bytes())).convert("RGB"))
                       for r in range(len(self.plan.rows))])
    buf = io.BytesIO()
    Image.fromarray(image_grid(images.astype(np.float32) / 127.5 - 1.0)).save(buf, format="PNG")
    write_atomic(self.out / "grid.png", buf.getvalue())


def iter_webdataset(out: pathlib.Path) -> Iterator[tuple[str, bytes, dict]]:
  """(key, png bytes, meta) of every sample in OUT's shards, in shard order."""
  for shard in sorted(paths.as_path(out).glob("shard-*.tar"), key=str):
    members = dict(tar_members(shard))
    for name in sorted(members):
      if name.endswith(".png"):
        key = name[:-4]
        yield key, members[name], json.loads(members[f"{key}.json"])
