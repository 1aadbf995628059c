"""Paths that may live in object storage (`gs://bucket/...`) or on the local disk.

Every path a user gives (workdirs, dataset folders, bundles, sample outputs, the compilation cache) goes through
`as_path`: a local path stays a `pathlib.Path` (behaviour unchanged), a URL becomes an `etils.epath.Path` (gcsfs
under the hood for `gs://`; orbax and tensorstore take the URL as is). `pathlib` must never see a URL: it turns
`gs://b/x` into the local folder `gs:/b/x`.

Object stores have no atomic rename. Where the code writes atomically on a local disk (write a temporary file,
then `os.replace`), it writes the final object in one upload on `gs://` instead (`write_bytes`/`write_text`: an
object appears complete or not at all), and a folder "move" is a copy then a delete (`move_tree`).
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shutil
import uuid
from typing import Any, Iterator, Union

from etils import epath

PathLike = Union[str, os.PathLike]
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class UnreachablePathError(FileNotFoundError):
  """A user-given path cannot be read or written; the message names the path and what it was for."""


def is_remote(path: PathLike) -> bool:
  """True for URLs (`gs://...`, `s3://...`), False for local paths."""
  return bool(_URL.match(os.fspath(path) if not isinstance(path, epath.Path) else str(path)))


def as_path(path: PathLike, *, absolute: bool = False):
  """`path` as a path object: `pathlib.Path` when local (optionally absolute), `epath.Path` for a URL."""
  text = str(path) if isinstance(path, epath.Path) else os.fspath(path)
  if is_remote(text):
    return epath.Path(text)
  p = pathlib.Path(text).expanduser()
  return p.absolute() if absolute else p


def check_reachable(path: PathLike, what: str, *, write: bool = False):
  """Fails fast, before any compute, when `path` cannot be used: one error naming `path` and `what` it is.

  Reading: `path` must exist. Writing: for a URL the bucket must exist (a probe object is written and deleted); a
  local folder's nearest existing parent must be writable. Returns `as_path(path)`.
  """
  p = as_path(path)
  try:
    if not write:
      if not p.exists():
        raise UnreachablePathError(f"{what} {path} does not exist")
      return p
    if is_remote(p):
      probe = p / f".unclip_jax_write_probe.{uuid.uuid4().hex}"
      probe.write_bytes(b"")
      probe.unlink()
    else:
      parent = p
      while not parent.exists() and parent != parent.parent:
        parent = parent.parent
      if not os.access(parent, os.W_OK):
        raise UnreachablePathError(f"{what} {path} is not writable ({parent} is read-only)")
  except UnreachablePathError:
    raise
  except Exception as e:  # noqa: BLE001 - credentials, a missing bucket, DNS, ...: one error naming the path
    raise UnreachablePathError(f"{what} {path} cannot be {'written' if write else 'read'}: "
                               f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
                               ) from e
  return p


def walk_files(root: PathLike) -> Iterator[tuple[str, Any]]:
  """(relative "/"-separated path, path object) of every file below the folder `root` (local or URL), sorted.

  Works where `glob("**")` does not (etils refuses recursive globs on gs://).
  """
  def walk(p, rel):
    for child in sorted(p.iterdir(), key=lambda c: c.name):
      if child.is_dir():
        yield from walk(child, f"{rel}{child.name}/")
      else:
        yield f"{rel}{child.name}", child

  yield from walk(as_path(root), "")


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` so a reader sees the old content or the new, never a partial file.

  Local: a temporary sibling (unique to this process), flushed to disk, then `os.replace`. URL: one upload of the
  final object (object writes are atomic).
  """
  p = as_path(path)
  if is_remote(p):
    p.write_bytes(data)
    return
  tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, p)


def copy_tree(src: PathLike, dst: PathLike) -> None:
  """Copies the folder `src` to `dst` (either may be a URL)."""
  src, dst = as_path(src), as_path(dst)
  if not is_remote(src) and not is_remote(dst):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return
  dst.mkdir(parents=True, exist_ok=True)
  for child in src.iterdir():
    if child.is_dir():
      copy_tree(child, dst / child.name)
    else:
      (dst / child.name).write_bytes(child.read_bytes())


def remove_tree(path: PathLike) -> None:
  p = as_path(path)
  if is_remote(p):
    if p.exists():
      p.rmtree()
  elif p.exists():
    shutil.rmtree(p)


def move_tree(src: PathLike, dst: PathLike) -> None:
  """Moves the folder `src` to `dst`: a rename on a local disk, a copy then a delete on object storage."""
  src, dst = as_path(src), as_path(dst)
  if not is_remote(src) and not is_remote(dst):
    os.rename(src, dst)
    return
  copy_tree(src, dst)
  remove_tree(src)


def default_cache_root() -> pathlib.Path:
  return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "unclip_jax"


def stage_locally(url: PathLike, cache: PathLike | None = None) -> pathlib.Path:
  """A local copy of the remote folder `url` (for readers of local files only, e.g. array_record), made once.

  The copy lives in `<cache>/<hash of url>/<name>` (default cache: `~/.cache/unclip_jax/staged`) and is reused
  while every remote file has the same size. It is written to a temporary folder and renamed, so concurrent
  processes on one host never see half a copy. Local paths are returned unchanged.
  """
  if not is_remote(url):
    return pathlib.Path(os.fspath(url))
  src = as_path(url)
  root = pathlib.Path(cache) if cache else default_cache_root() / "staged"
  key = hashlib.sha256(str(src).rstrip("/").encode()).hexdigest()[:16]
  dest = root / key / src.name
  files = dict(walk_files(src))
  if dest.is_dir() and all((dest / r).is_file() and (dest / r).stat().st_size == f.stat().length
                           for r, f in files.items()):
    return dest
  tmp = root / key / f".{src.name}.{uuid.uuid4().hex[:8]}.tmp"
  for rel, f in files.items():
    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
    with f.open("rb") as fin, open(tmp / rel, "wb") as fout:
      shutil.copyfileobj(fin, fout, 8 << 20)
  if dest.exists():
    shutil.rmtree(dest, ignore_errors=True)
  try:
    os.rename(tmp, dest)
  except OSError:                         # another process on this host staged it first
    shutil.rmtree(tmp, ignore_errors=True)
  return dest
