"""grain input pipeline over the array_record datasets written by `builders.py`.

  tfds data source (one dataset, or several zipped by index, e.g. images + precomputed embeddings)
    -> [process_index::process_count]      per-host shard by index (disjoint across hosts)
    -> shuffle(seed) -> repeat()           reshuffled every epoch; never runs dry, so no host waits at an epoch end
    -> random_map(preprocess)              images: random resize-crop to `image_size`, float32 [-1, 1] [H, W, 3]
                                           text: str; class labels/ints: int32; tensors: as stored
    -> batch(per_host_batch_size, drop_remainder=True)
    -> to_iter_dataset(ReadOptions) -> optional mp_prefetch(workers)

Every random choice is a function of (seed, element index), so a run is reproducible and an iterator restored
with `set_state(get_state())` continues with exactly the next batch. Batches are per-host numpy dicts; turn
them into global arrays with `global_batch.to_global`. Everything is an argument: no jax.process_index() here.
"""
from __future__ import annotations

import functools
import os
import pathlib
from typing import Any, Mapping, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from unclip_jax import paths


def resolve_dataset_dir(path: str | os.PathLike):
  """The directory holding dataset_info.json: `path` itself, or the single (newest-version) one below it.

  A `gs://` path stays a URL (an `epath.Path`); one that cannot be read raises UnreachablePathError naming it.
  """
  if paths.is_remote(path):
    paths.check_reachable(path, "dataset directory")
  path = paths.as_path(path)
  if (path / "dataset_info.json").is_file():
    return path
  found = sorted(f.parent for rel, f in paths.walk_files(path) if rel.rsplit("/", 1)[-1] == "dataset_info.json"
                 ) if path.is_dir() else []
  found = [p for p in found if "incomplete" not in str(p)]
  if not found:
    raise FileNotFoundError(f"no tfds dataset (dataset_info.json) at or below {path}")
  parents = {p.parent for p in found}
  if len(parents) > 1:
    raise ValueError(f"several datasets below {path}: {[str(p) for p in found]}; pass one of them")
  return max(found, key=lambda p: tuple(int(x) for x in p.name.split(".")) if p.name[0].isdigit() else ())


class ZipSource:
  """Random-access source whose element i merges element i of every source (keys must not collide)."""

  def __init__(self, sources: Sequence[Any]):
    lengths = [len(s) for s in sources]
    if len(set(lengths)) != 1:
      raise ValueError(f"zipped datasets differ in length: {lengths}")
    self._sources = list(sources)

  def __len__(self) -> int:
    return len(self._sources[0])

  def __getitem__(self, index: int) -> dict:
    out = {}
    for s in self._sources:
      ex = s[index]
      clash = out.keys() & ex.keys()
      if clash:
        raise ValueError(f"zipped datasets share feature names {sorted(clash)}")
      out.update(ex)
    return out


def open_source(data_dirs: str | os.PathLike | Sequence[str | os.PathLike], split: str = "train"):
  """-> (random-access source of example dicts, {feature name: tfds feature}). Several dirs are zipped."""
  if isinstance(data_dirs, (str, os.PathLike)):
    data_dirs = [data_dirs]
  if not data_dirs:
    raise ValueError("no dataset directory given")
  sources, features = [], {}
  for d in data_dirs:
    found = resolve_dataset_dir(d)
    if paths.is_remote(found):         # array_record reads local files only: a per-host copy, made once
      found = paths.stage_locally(found, os.environ.get("UNCLIP_JAX_DATA_CACHE") or None)
    builder = tfds.builder_from_directory(os.fspath(found))
    if split not in builder.info.splits:
      raise ValueError(f"{d}: no split {split!r}; has {list(builder.info.splits)}")
    sources.append(builder.as_data_source(split))
    features.update(builder.info.features.items())
  return (sources[0] if len(sources) == 1 else ZipSource(sources)), features


def random_resize_crop(image: np.ndarray, size: int, rng: np.random.Generator, max_scale: float = 1.0) -> np.ndarray:
  """[H, W, 3] uint8 -> [size, size, 3] uint8: shortest side resized to size·u (u ~ U[1, max_scale], PIL bicubic,
  antialiased), then a uniformly random size×size crop. No resampling when the shortest side already fits."""
  h, w = image.shape[:2]
  target = size * (rng.uniform(1.0, max_scale) if max_scale > 1.0 else 1.0)
  scale = target / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  if (nh, nw) != (h, w):
    image = np.asarray(Image.fromarray(image).resize((nw, nh), resample=Image.Resampling.BICUBIC))
  top = int(rng.integers(0, nh - size + 1))
  left = int(rng.integers(0, nw - size + 1))
  return image[top:top + size, left:left + size]


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 in [-1, 1]."""
  return image.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


def preprocess(example: Mapping[str, Any], rng: np.random.Generator, *, features: Mapping[str, Any],
               image_size: int | None, max_scale: float = 1.0) -> dict:
  """One decoded tfds example -> dict of numpy leaves / str, per feature type (see module docstring)."""
  out = {}
  for k, v in example.items():
    f = features.get(k)
    if isinstance(f, tfds.features.Image):
      if image_size is not None:
        v = random_resize_crop(v, image_size, rng, max_scale)
      out[k] = to_float(v)
    elif isinstance(f, tfds.features.Text):
      out[k] = v.decode("utf-8") if isinstance(v, bytes) else str(v)
    elif isinstance(v, (int, np.integer)):
      out[k] = np.int32(v)
    else:
      out[k] = np.asarray(v)
  return out


def make_dataset(data_dirs: str | os.PathLike | Sequence[str | os.PathLike], *, batch_size: int, seed: int,
                 split: str = "train", image_size: int | None = None, max_scale: float = 1.0,
                 process_index: int = 0, process_count: int = 1, num_epochs: int | None = None) -> grain.MapDataset:
  """MapDataset of per-host batches (`batch_size` = per-host batch). num_epochs=None repeats forever."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if max_scale < 1.0:
    raise ValueError(f"max_scale must be >= 1, got {max_scale}")
  source, features = open_source(data_dirs, split)
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if len(ds) == 0:
    raise ValueError(f"process {process_index}/{process_count} has no examples ({len(source)} in {split!r})")
  fn = functools.partial(preprocess, features=features, image_size=image_size, max_scale=max_scale)
  return (ds.shuffle(seed=seed).repeat(num_epochs)
          .random_map(fn, seed=seed)
          .batch(batch_size, drop_remainder=True))


def make_iterator(dataset: grain.MapDataset, *, read_threads: int = 4, prefetch_buffer_size: int = 64,
                  workers: int = 0) -> grain.DatasetIterator:
  """Checkpointable iterator (`get_state`/`set_state`; orbax via grain.checkpoint). workers > 0 adds
  mp_prefetch (absl flags must be parsed first)."""
  ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size))
  if workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(ds)


def per_host_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} processes")
  return global_batch_size // process_count
