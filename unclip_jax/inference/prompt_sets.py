"""Prompt sets for batch sampling: .txt, .jsonl, .csv, .parquet tables and COCO caption annotations.

Every reader returns a `PromptSet`: ids [N] (str, unique) and captions [N], in file order. Image k of prompt p
(p = position in the set) is the row (p, k) of `unclip_jax.inference.batch`.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import pathlib
from typing import Sequence

CAPTION_COLUMNS = ("caption", "prompt", "text")
ID_COLUMNS = ("id", "key", "image_id")


@dataclasses.dataclass
class PromptSet:
  ids: list[str]
  captions: list[str]
  source: dict              # what was read (path, format, columns; COCO: n, seed and the chosen image ids)

  def __post_init__(self):
    if not self.captions:
      raise ValueError(f"no prompts in {self.source.get('path', 'the input')}")
    if len(self.ids) != len(self.captions):
      raise ValueError("one id per caption")
    if len(set(self.ids)) != len(self.ids):
      dup = next(i for i in self.ids if self.ids.count(i) > 1)
      raise ValueError(f"prompt ids must be unique; {dup!r} repeats in {self.source.get('path')}")
    bad = [i for i, c in enumerate(self.captions) if not isinstance(c, str)]
    if bad:
      raise ValueError(f"caption of row {bad[0]} is not a string: {self.captions[bad[0]]!r}")

  def digest(self) -> str:
    """sha256 of the ids and captions (what the manifest records)."""
    h = hashlib.sha256()
    for i, c in zip(self.ids, self.captions):
      h.update(json.dumps([i, c]).encode())
    return h.hexdigest()


def _pick(columns: Sequence[str], wanted: str | None, defaults: Sequence[str], what: str, path) -> str | None:
  if wanted is not None:
    if wanted not in columns:
      raise ValueError(f"{path}: no {what} column {wanted!r}; columns: {list(columns)}")
    return wanted
  found = [c for c in defaults if c in columns]
  if not found and what == "caption":
    raise ValueError(f"{path}: no caption column (looked for {list(defaults)}; pass --caption-column); "
                     f"columns: {list(columns)}")
  return found[0] if found else None


def _table(path: pathlib.Path, records: list[dict], columns: Sequence[str], caption_column, id_column,
           fmt: str) -> PromptSet:
  cap = _pick(columns, caption_column, CAPTION_COLUMNS, "caption", path)
  idc = _pick(columns, id_column, ID_COLUMNS, "id", path)
  captions = [r.get(cap) for r in records]
  ids = [str(r.get(idc)) for r in records] if idc else [str(i) for i in range(len(records))]
  return PromptSet(ids, captions, dict(path=str(path), format=fmt, caption_column=cap, id_column=idc))


def read(path: str | pathlib.Path, *, caption_column: str | None = None, id_column: str | None = None) -> PromptSet:
  """A prompt file by its suffix: .txt (one prompt a line, blank lines skipped; ids = 0, 1, ...), .jsonl, .csv or
  .parquet (a caption column — caption/prompt/text unless named — and an optional id column — id/key/image_id)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"prompts file not found: {path}")
  suffix = path.suffix.lower()
  if suffix == ".jsonl":
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
      if line.strip():
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{n + 1}: not JSON ({e})") from None
    columns = sorted({c for r in records for c in r})
    return _table(path, records, columns, caption_column, id_column, "jsonl")
  if suffix == ".csv":
    with path.open(newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      records = list(reader)
      return _table(path, records, reader.fieldnames or [], caption_column, id_column, "csv")
  if suffix == ".parquet":
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return _table(path, table.to_pylist(), table.column_names, caption_column, id_column, "parquet")
  prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
  if not prompts:
    raise ValueError(f"no prompts in {path}")
  return PromptSet([str(i) for i in range(len(prompts))], prompts, dict(path=str(path), format="txt"))


def read_coco(path: str | pathlib.Path, n: int, seed: int) -> PromptSet:
  """The FID-30k protocol on COCO caption annotations (captions_val2014.json): `n` image ids drawn without
  replacement (numpy default_rng(seed)), one of each image's captions drawn at random; ids = the image ids."""
  import numpy as np

  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"COCO captions file not found: {path}")
  data = json.loads(path.read_text(encoding="utf-8"))
  if "annotations" not in data:
    raise ValueError(f"{path} is not a COCO captions file (no 'annotations')")
  by_image: dict[int, list[str]] = {}
  for a in data["annotations"]:
    by_image.setdefault(int(a["image_id"]), []).append(" ".join(str(a["caption"]).split()))
  image_ids = sorted(by_image)
  if not 0 < n <= len(image_ids):
    raise ValueError(f"--n must be in 1..{len(image_ids)} (the images with captions in {path}), got {n}")
  rng = np.random.default_rng(seed)
  chosen = [image_ids[i] for i in rng.choice(len(image_ids), size=n, replace=False)]
  captions = [by_image[i][int(rng.integers(len(by_image[i])))] for i in chosen]
  return PromptSet([str(i) for i in chosen], captions,
                   dict(path=str(path), format="coco", n=n, seed=seed, image_ids=chosen))
