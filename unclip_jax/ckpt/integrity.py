"""Integrity records: size + sha256 of every file of a checkpoint step or bundle, and their verification.

A record maps paths relative to a root folder ("/"-separated) to {"size": bytes, "sha256": hex digest}:

  ROOT/integrity.json   {"format": "unclip_jax.integrity", "version": 1, "algorithm": "sha256",
                         "files": {"state/_METADATA": {"size": 6221, "sha256": "…"}, …}}

Records are written atomically (a temporary file renamed into place), after every file they describe. Paths are
`etils.epath.Path`s, so the same code reads local folders and object stores (gs://…) alike.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any, Mapping

from etils import epath

from unclip_jax import paths

RECORD_NAME = "integrity.json"
FORMAT = "unclip_jax.integrity"
VERSION = 1
CHUNK = 1 << 20


class IntegrityError(ValueError):
  """A file is missing, truncated or differs from its integrity record; `path` names it."""

  def __init__(self, message: str, path: str = ""):
    super().__init__(message)
    self.path = path


def file_digest(path) -> dict[str, Any]:
  """{"size": bytes, "sha256": hex} of one file, read in 1 MiB chunks."""
  h, size = hashlib.sha256(), 0
  with epath.Path(path).open("rb") as f:
    while chunk := f.read(CHUNK):
      h.update(chunk)
      size += len(chunk)
  return {"size": size, "sha256": h.hexdigest()}


def list_files(root, exclude: tuple[str, ...] = (RECORD_NAME,)) -> list[str]:
  """Every file under `root` (relative, "/"-separated, sorted), without `exclude` (names at the top level)."""
  return [rel for rel, _ in paths.walk_files(epath.Path(root)) if rel not in exclude]


def digests(root, files: list[str] | None = None) -> dict[str, dict[str, Any]]:
  """{relative path: {"size", "sha256"}} for `files` under `root` (default: every file but the record)."""
  root = epath.Path(root)
  files = list_files(root) if files is None else files
  return {rel: file_digest(root / rel) for rel in files}


def write_record(root, files: Mapping[str, Mapping[str, Any]] | None = None, **extra) -> dict[str, Any]:
  """Hashes every file under `root` (or takes `files`) and writes ROOT/integrity.json atomically. Returns it."""
  root = epath.Path(root)
  record = {"format": FORMAT, "version": VERSION, "algorithm": "sha256", **extra,
            "files": dict(digests(root) if files is None else files)}
  write_json_atomic(root / RECORD_NAME, record)
  return record


def write_json_atomic(path, obj) -> None:
  """Writes JSON to a temporary sibling, then renames it over `path` (readers see the old or the new file).

  On object storage (no rename) the final object is written in one upload, which is atomic there.
  """
  path = epath.Path(path)
  if paths.is_remote(path):
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))
    return
  tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
  tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
  tmp.replace(path)


def read_record(root) -> dict[str, Any] | None:
  """ROOT/integrity.json, or None when there is none. Raises IntegrityError when it is unreadable."""
  path = epath.Path(root) / RECORD_NAME
  if not path.exists():
    return None
  try:
    record = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise IntegrityError(f"{RECORD_NAME}: unreadable integrity record ({e})", RECORD_NAME) from e
  if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("files"), dict):
    raise IntegrityError(f"{RECORD_NAME}: not an unclip_jax integrity record", RECORD_NAME)
  return record


def check_files(root, files: Mapping[str, Mapping[str, Any]]) -> None:
  """Checks every file of a record under `root`; the first missing, truncated or different one raises
  IntegrityError with the relative path (`.path`) and what is wrong. Files not in the record are not checked."""
  root = epath.Path(root)
  for rel in sorted(files):
    want = files[rel]
    path = root / rel
    if not path.is_file():
      raise IntegrityError(f"{rel}: missing", rel)
    size = int(path.stat().length)             # cheap: a wrong size needs no hashing
    if size == int(want["size"]):
      got = file_digest(path)
      size = got["size"]
    if size != int(want["size"]):
      kind = "truncated" if size < int(want["size"]) else "longer than recorded"
      raise IntegrityError(f"{rel}: {kind} ({size} bytes, the record says {want['size']})", rel)
    if got["sha256"] != want["sha256"]:
      raise IntegrityError(f"{rel}: sha256 mismatch (contents changed since it was written)", rel)


def verify(root) -> bool:
  """Checks `root` against its integrity record. True when verified, False when it has no record (nothing to
  check against); raises IntegrityError naming the first bad file otherwise."""
  record = read_record(root)
  if record is None:
    return False
  check_files(root, record["files"])
  return True

