"""The MS-COCO text-to-image protocol (FID-30k and CLIP score) as one resumable job: `python -m unclip_jax.eval coco`.

  1. prompts     `--n` image ids of the captions file drawn with `--seed`, one random caption each: the sample
                 CLI's `--coco-captions` (`inference.prompt_sets.read_coco`, reused, so the ids are the same).
  2. samples     `python -m unclip_jax.sample --coco-captions ... --out OUT/samples --no-grid` (the resumable batch
                 job, run in-process: a rerun skips finished batches).
  3. reference   the val images of the chosen ids (`--reference ids`, default) or every image of `--images`
                 (`--reference all`), each brought to the samples' square size by `square_resize` (shortest side ->
                 size with PIL bicubic, centre crop; `--real-resize none` leaves it to the feature protocol), then
                 the feature extractor's own protocol. Their statistics are cached in OUT under a key of
                 everything that decides them (`reference_record`), so a rerun reuses them.
  4. FID         `python -m unclip_jax.eval fid --real OUT/real_stats-<key>.npz --fake OUT/samples` (the same code).
  5. CLIP score  `python -m unclip_jax.eval clip-score --images OUT/samples`, and the reference images against the
                 same captions (`clip_score_real`, with `--reference ids`), cached like the statistics.

This module holds the pieces that are not the CLI: COCO file names, the reference image list, the square resize
and the cache key. `eval/__main__.py` runs the steps.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Iterator, Sequence

import numpy as np

from unclip_jax.eval import images as images_lib

REFERENCES = ("ids", "all")
REAL_RESIZES = ("center-crop", "none")
RECORD_FORMAT = "unclip_jax.coco_reference.v1"


class CocoError(ValueError):
  """Bad COCO input (a captions file without images, ids without an image file, ...); the message names it."""


def expected_file_names(image_id: int) -> tuple[str, ...]:
  """File names a COCO image id goes by when the captions file has no "images" table: val2014, then 2017 style."""
  return (f"COCO_val2014_{image_id:012d}.jpg", f"{image_id:012d}.jpg")


def file_names_from_captions(path: str | os.PathLike) -> dict[int, str]:
  """{image id: file_name} from the captions file's "images" table ({} when it has none)."""
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  out = {}
  for entry in data.get("images", []) or []:
    if isinstance(entry, dict) and "id" in entry and isinstance(entry.get("file_name"), str):
      out[int(entry["id"])] = entry["file_name"]
  return out


def index_folder(folder: str | os.PathLike) -> dict[str, str]:
  """{file name: path} of every image below `folder` (recursive); a name found twice maps to None (ambiguous)."""
  out: dict[str, str | None] = {}
  for root, _, files in os.walk(folder):
    for name in files:
      if name.lower().endswith(images_lib.IMAGE_EXTENSIONS):
        out[name] = None if name in out else os.path.join(root, name)
  return out


def reference_files(image_ids: Sequence[int], folder: str | os.PathLike, file_names: dict[int, str]) -> list[str]:
  """The image file of every id, in id order (the captions' "images" table first, then `expected_file_names`).

  Raises CocoError naming how many ids have no file, the first few, and the names looked for.
  """
  if not os.path.isdir(folder):
    raise CocoError(f"--images: not a folder: {folder}" if os.path.exists(folder) else
                    f"--images: path not found: {folder}")
  index = index_folder(folder)
  files, missing, ambiguous = [], [], []
  for i in image_ids:
    names = (file_names[i],) + expected_file_names(i) if i in file_names else expected_file_names(i)
    hit = next((n for n in names if n in index), None)
    if hit is None:
      missing.append((i, names[0]))
    elif index[hit] is None:
      ambiguous.append(hit)
    else:
      files.append(index[hit])
  if missing:
    shown = ", ".join(f"{i} ({name})" for i, name in missing[:5])
    raise CocoError(f"{len(missing)} of the {len(image_ids)} chosen image ids have no image file in {folder}: "
                    f"{shown}{', ...' if len(missing) > 5 else ''}; is --images the folder of the captions' split?")
  if ambiguous:
    raise CocoError(f"--images {folder}: {len(ambiguous)} image file names occur in more than one subfolder "
                    f"(e.g. {ambiguous[0]}); point --images at the split's own folder")
  return files


def square_resize(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3]: shortest side -> size (PIL bicubic), centre crop."""
  from unclip_jax.data import image_processing

  return image_processing.center_crop(image_processing.resize_shortest_side(image, size), size)


def resized(items: Iterable[tuple[str, np.ndarray]], resize: str, size: int) -> Iterator[tuple[str, np.ndarray]]:
  """(name, uint8 image) pairs through `square_resize` (resize "center-crop") or unchanged ("none")."""
  for name, image in items:
    yield name, (square_resize(image, size) if resize == "center-crop" else image)


def reference_record(*, reference: str, images: str, files: Sequence[str], resize: str, size: int, features: str,
                     protocol: str, fingerprint: str | None, **extra) -> dict:
  """Everything that decides the reference statistics (the cache key is its hash); `extra` joins it."""
  rel = [os.path.relpath(f, images) for f in files]
  return dict(format=RECORD_FORMAT, reference=reference, images=os.path.abspath(images), n=len(files),
              files_sha256=hashlib.sha256("\n".join(rel).encode()).hexdigest(), resize=resize, size=size,
              features=features, protocol=protocol, fingerprint=fingerprint, **extra)


def record_key(record: dict) -> str:
  return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
