"""Image sources for evaluation: a folder of images, webdataset `.tar` shards, or a glob of either.

Every image is decoded with PIL and converted to RGB (`Image.open(f).convert("RGB")`, as pytorch-fid and clean-fid
do), giving uint8 [H, W, 3]. Order is deterministic: files sorted by path; tar members in archive order.

  folder:        every *.png / *.jpg / *.jpeg / *.webp / *.bmp (any case) below it, recursively; if it has no
                 images but holds *.tar shards, those shards.
  shard(s):      `data-000.tar`, or a glob such as `shards/*.tar`; members named `<key>.png|jpg|jpeg|webp`
                 (webdataset layout; other members such as `<key>.txt` / `.json` are skipped).
"""
from __future__ import annotations

import glob
import io
import os
import tarfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageSourceError(ValueError):
  """A missing path, an empty source, or an image that cannot be decoded (the message names it)."""


@dataclass(frozen=True)
class ImageSource:
  """Resolved images: loose `files`, then `shards` as (shard path, image member names in archive order)."""
  description: str
  files: tuple[str, ...] = ()
  shards: tuple[tuple[str, tuple[str, ...]], ...] = ()

  def __len__(self) -> int:
    return len(self.files) + sum(len(members) for _, members in self.shards)

  def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, uint8 RGB [H, W, 3]); shards are streamed member by member."""
    for f in self.files:
      with open(f, "rb") as fh:
        yield f, decode_image(f, fh)
    for shard, members in self.shards:
      wanted = set(members)
      with tarfile.open(shard) as tf:
        for m in tf:
          if m.name in wanted:
            name = f"{shard}:{m.name}"
            yield name, decode_image(name, io.BytesIO(tf.extractfile(m).read()))


def decode_image(name: str, fileobj: io.IOBase) -> np.ndarray:
  """Decode to uint8 RGB [H, W, 3]; any failure is an `ImageSourceError` naming the image."""
  try:
    with Image.open(fileobj) as img:
      return np.asarray(img.convert("RGB"), dtype=np.uint8)
  except Exception as e:
    raise ImageSourceError(f"cannot read image {name}: {type(e).__name__}: {e}") from e


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _tar_members(shard: str) -> tuple[str, tuple[str, ...]]:
  try:
    with tarfile.open(shard) as tf:
      return shard, tuple(m.name for m in tf.getmembers() if m.isfile() and _is_image(m.name))
  except (tarfile.TarError, OSError) as e:
    raise ImageSourceError(f"cannot read shard {shard}: {e}") from e


def open_images(path: str | os.PathLike) -> ImageSource:
  """Resolve `path` (folder, .tar shard, or glob) to an `ImageSource`; errors for missing or empty sources."""
  path = os.fspath(path)
  if any(ch in path for ch in "*?["):
    matches = sorted(glob.glob(path))
    if not matches:
      raise ImageSourceError(f"no files match {path}")
    shards = [m for m in matches if m.endswith(".tar")]
    images = [m for m in matches if _is_image(m) and os.path.isfile(m)]
    files, shard_list = images, shards
  elif os.path.isdir(path):
    files = sorted(os.path.join(root, f) for root, _, fs in os.walk(path) for f in fs)
    images = [f for f in files if _is_image(f)]
    shard_list = [] if images else [f for f in files if f.endswith(".tar")]
    files = images
  elif os.path.isfile(path):
    if path.endswith(".tar"):
      files, shard_list = [], [path]
    elif _is_image(path):
      files, shard_list = [path], []
    else:
      raise ImageSourceError(f"{path} is neither a folder, an image, a .tar shard nor a .npz statistics file")
  else:
    raise ImageSourceError(f"path not found: {path}")
  source = ImageSource(description=path, files=tuple(files), shards=tuple(_tar_members(s) for s in shard_list))
  if not len(source):
    raise ImageSourceError(f"no images found in {path} (looked for {', '.join(IMAGE_EXTENSIONS)} files "
                           "or webdataset .tar shards with such members)")
  return source
