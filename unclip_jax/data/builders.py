"""tfds builders that write array_record datasets: image-text pairs and precomputed (CLIP) embeddings.

Image-text records come from three sources, each a generator of `Record(key, image, caption)`:
  folder_records      `x.jpg` + `x.txt` side by side, any depth
  webdataset_records  `*.tar` shards with `key.{jpg,jpeg,png,webp}` + `key.txt` members (read with `tarfile`)
  parquet_records     parquet file(s) with an image-bytes column and a caption column (pyarrow)

`build_image_text` decodes every image once (to validate it), optionally downsizes it, and writes
  image    tfds Image [H, W, 3] uint8, stored encoded (PNG or JPEG)
  caption  tfds Text, whitespace-stripped (reads back as bytes); empty captions are skipped
  + optional extra features (e.g. the shapes dataset's class labels)
to `<out_dir>/image_text/<name>/1.0.0/`. Undecodable images, missing captions and unreadable shards are skipped
and listed (key + reason) in `build_report.json` beside the dataset, and printed; a build never crashes on bad
data and never drops a record silently. `build_embeddings` writes numpy arrays (one row per example, in order) as Tensor
features to `<out_dir>/embeddings/<name>/1.0.0/`.

Only standard-library and PIL decoding is used; nothing here needs TensorFlow.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import pathlib
import shutil
import tarfile
import tempfile
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from etils import epath
import tensorflow_datasets as tfds
from PIL import Image, ImageOps

from unclip_jax import paths

log = logging.getLogger(__name__)

VERSION = "1.0.0"
REPORT_FILE = "build_report.json"
PRINT_SKIPPED = 20  # skipped records printed at the end of a build (all of them go to REPORT_FILE)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
ENCODING_FORMATS = ("png", "jpeg")
JPEG_QUALITY = 95
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG"}
_EXIF_ORIENTATION = 0x0112


@dataclasses.dataclass(frozen=True)
class Record:
  """One source example. `image` is encoded bytes or a PIL image; `error` marks a record already known bad."""
  key: str
  image: bytes | Image.Image | None
  caption: str | None
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  error: str | None = None


@dataclasses.dataclass
class BuildReport:
  """What a build wrote and what it skipped (key + reason per skipped record)."""
  written: int = 0
  skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)

  def skip(self, key: str, reason: str) -> None:
    log.warning("skipping %s: %s", key, reason)
    self.skipped.append({"key": key, "reason": reason})

  def to_json(self) -> dict:
    return {"written": self.written, "num_skipped": len(self.skipped), "skipped": self.skipped}


# ---- sources --------------------------------------------------------------------------------------------------
def folder_records(root: str | os.PathLike) -> Iterator[Record]:
  """Images under `root` (recursive, sorted) with the caption in the same-stem `.txt` file beside them."""
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"image folder {root} does not exist")
  return _folder_records(root)


def _folder_records(root: pathlib.Path) -> Iterator[Record]:
  for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
    key = path.relative_to(root).as_posix()
    txt = path.with_suffix(".txt")
    if not txt.is_file():
      yield Record(key, None, None, error=f"no caption file {txt.name}")
      continue
    try:
      yield Record(key, path.read_bytes(), txt.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError) as e:
      yield Record(key, None, None, error=f"unreadable: {e}")


def _split_wds_name(name: str) -> tuple[str, str]:
  """webdataset convention: key = path up to the first dot of the basename, extension = the rest."""
  head, base = os.path.split(name)
  stem, _, ext = base.partition(".")
  return (f"{head}/{stem}" if head else stem), ext.lower()


def _shard_paths(path: str | os.PathLike, suffix: str) -> list[pathlib.Path]:
  path = pathlib.Path(path)
  if path.is_dir():
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(suffix))
    if not files:
      raise FileNotFoundError(f"no *{suffix} files in directory {path}")
    return files
  if path.is_file():
    return [path]
  files = sorted(path.parent.glob(path.name)) if path.parent.is_dir() else []
  if not files:
    raise FileNotFoundError(f"input {path} does not exist (expected a {suffix} file, a directory or a glob)")
  return files


def webdataset_records(path: str | os.PathLike) -> Iterator[Record]:
  """Samples from webdataset-style tar shards (a `.tar` file, a directory of them, or a glob).

  Members of one sample are contiguous (the webdataset convention); a sample is complete when the key changes.
  Nothing is extracted to disk. A truncated or unreadable shard is reported and the rest of it skipped.
  Missing input raises at call time.
  """
  return _webdataset_records(_shard_paths(path, ".tar"))


def _webdataset_records(shards: list[pathlib.Path]) -> Iterator[Record]:
  for shard in shards:
    sample, current = {}, None

    def flush(key, parts):
      image_ext = next((e for e in WDS_IMAGE_EXTENSIONS if e in parts), None)
      full_key = f"{shard.name}/{key}"
      if image_ext is None:
        return Record(full_key, None, None, error=f"no image member (has {sorted(parts)})")
      if "txt" not in parts:
        return Record(full_key, None, None, error="no .txt caption member")
      try:
        return Record(full_key, parts[image_ext], parts["txt"].decode("utf-8"))
      except UnicodeDecodeError as e:
        return Record(full_key, None, None, error=f"caption is not utf-8: {e}")

    try:
      with tarfile.open(shard, mode="r:*") as tar:
        for member in tar:
          if not member.isfile():
            continue
          key, ext = _split_wds_name(member.name)
          if key != current and sample:
            yield flush(current, sample)
            sample = {}
          current = key
          f = tar.extractfile(member)
          sample[ext] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
      yield Record(f"{shard.name}", None, None, error=f"unreadable tar shard (rest of shard skipped): {e}")
    if sample:
      yield flush(current, sample)


def _pick_column(names: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, path) -> str:
  if wanted is not None:
    if wanted not in names:
      raise ValueError(f"{path}: no {what} column {wanted!r}; columns are {list(names)}")
    return wanted
  for c in candidates:
    if c in names:
      return c
  raise ValueError(f"{path}: cannot find a {what} column among {list(names)}; pass it explicitly")


def parquet_records(path: str | os.PathLike, image_column: str | None = None,
                    caption_column: str | None = None, batch_rows: int = 256) -> Iterator[Record]:
  """Rows of parquet file(s): image column of encoded bytes (or `{"bytes": ...}` structs), caption column.

  Missing input raises at call time; a missing column raises when reading starts.
  """
  return _parquet_records(_shard_paths(path, ".parquet"), image_column, caption_column, batch_rows)


def _parquet_records(files, image_column, caption_column, batch_rows) -> Iterator[Record]:
  import pyarrow.parquet as pq

  for file in files:
    pf = pq.ParquetFile(file)
    names = pf.schema_arrow.names
    icol = _pick_column(names, image_column, ("image", "jpg", "png", "img", "image_bytes"), "image", file)
    ccol = _pick_column(names, caption_column, ("caption", "text", "txt"), "caption", file)
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[icol, ccol]):
      for image, caption in zip(batch.column(icol).to_pylist(), batch.column(ccol).to_pylist()):
        key = f"{file.name}:{row}"
        row += 1
        if isinstance(image, dict):
          image = image.get("bytes")
        if not isinstance(image, (bytes, bytearray)):
          yield Record(key, None, None, error=f"image cell is {type(image).__name__}, not bytes")
        elif not isinstance(caption, str):
          yield Record(key, None, None, error=f"caption cell is {type(caption).__name__}, not str")
        else:
          yield Record(key, bytes(image), caption)


# ---- image validation and encoding ----------------------------------------------------------------------------
def _downsize(image: Image.Image, size: int) -> Image.Image:
  """Shortest side -> `size` (aspect kept, bicubic, antialiased); images already that small are left alone."""
  w, h = image.size
  if min(w, h) <= size:
    return image
  scale = size / min(w, h)
  new = (max(size, round(w * scale)), max(size, round(h * scale)))
  return image.resize(new, resample=Image.Resampling.BICUBIC, reducing_gap=3.0)


def _to_rgb(image: Image.Image) -> Image.Image:
  """RGB; transparent images are composited onto white (not onto the black that convert("RGB") leaves)."""
  if image.mode == "RGB":
    return image
  if "A" in image.getbands() or "transparency" in image.info:
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
  return image.convert("RGB")


def encode_image(data: bytes | Image.Image, encoding_format: str, image_size: int | None = None) -> bytes:
  """Decode + validate, fix EXIF orientation, RGB, optional downsize; returns bytes in `encoding_format`.

  Original bytes are kept when nothing changes and they are already in the target format.
  Raises (OSError, ValueError, DecompressionBombError, ...) for undecodable input.
  """
  if isinstance(data, Image.Image):
    image, original = data, None
  else:
    image, original = Image.open(io.BytesIO(data)), data
    image.load()  # full decode: truncated files fail here
  if image.width < 1 or image.height < 1:
    raise ValueError(f"empty image {image.size}")
  same_format = original is not None and image.format == _PIL_FORMAT[encoding_format]
  rotated = original is not None and image.getexif().get(_EXIF_ORIENTATION, 1) != 1
  changed = rotated or image.mode != "RGB"
  image = _to_rgb(ImageOps.exif_transpose(image) if rotated else image)
  if image_size is not None:
    resized = _downsize(image, image_size)
    changed, image = changed or resized is not image, resized
  if same_format and not changed:
    return original
  buf = io.BytesIO()
  kwargs = {"quality": JPEG_QUALITY} if encoding_format == "jpeg" else {}
  image.save(buf, format=_PIL_FORMAT[encoding_format], **kwargs)
  return buf.getvalue()


def image_text_examples(records: Iterable[Record], report: BuildReport, encoding_format: str,
                        image_size: int | None = None) -> Iterator[tuple[str, dict]]:
  """Records -> (key, tfds example) for valid ones; bad ones go to `report`."""
  for r in records:
    if r.error is not None:
      report.skip(r.key, r.error)
      continue
    text = (r.caption or "").strip()
    if not text:
      report.skip(r.key, "empty caption")
      continue
    try:
      image = encode_image(r.image, encoding_format, image_size)
    except Exception as e:  # untrusted bytes: any decoder failure is a skipped record, never a crash
      report.skip(r.key, f"undecodable image: {type(e).__name__}: {e}")
      continue
    report.written += 1
    yield r.key, {"image": image, "caption": text, **r.extra}


# ---- builders -------------------------------------------------------------------------------------------------
class _FromExamples(tfds.core.GeneratorBasedBuilder):
  """A builder whose single `train` split comes from an `examples()` callable; the config name is the dataset's."""
  VERSION = tfds.core.Version(VERSION)
  # tfds derives this via importlib_resources (not installed); it is only used to look for a checksums file.
  code_path = epath.Path(__file__)

  def __init__(self, *, examples: Callable[[], Iterable[tuple[str, dict]]], features: dict,
               metadata: Mapping | None = None, disable_shuffling: bool = False, description: str = "", **kwargs):
    self._examples = examples
    self._features = features
    self._metadata = dict(metadata or {})
    self._disable_shuffling = disable_shuffling
    self._description = description
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self._description,
                                 features=tfds.features.FeaturesDict(self._features),
                                 metadata=tfds.core.MetadataDict(self._metadata),
                                 disable_shuffling=self._disable_shuffling)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    yield from self._examples()


class ImageText(_FromExamples):
  """image (encoded) + caption (+ extra features) pairs."""
  name = "image_text"


class Embeddings(_FromExamples):
  """Rows of precomputed arrays (e.g. CLIP text/image embeddings, token states), stored in input order."""
  name = "embeddings"


def dataset_dir(out_dir: str | os.PathLike, builder: str, name: str):
  """Directory a build writes (contains dataset_info.json): `<out_dir>/<builder>/<name>/<VERSION>` (a URL stays
  one: `gs://...` gives an `epath.Path`)."""
  return paths.as_path(out_dir) / builder / name / VERSION


def _prepare(cls, out_dir, name, overwrite, **kwargs):
  """Builds into `out_dir`. A `gs://` out_dir is built in a local temporary folder (array_record writes local
  files only) and then uploaded file by file; a failed build uploads nothing."""
  if not name or "/" in name or name != name.strip():
    raise ValueError(f"invalid dataset name {name!r}")
  target = dataset_dir(out_dir, cls.name, name)
  if paths.is_remote(out_dir):
    paths.check_reachable(out_dir, "dataset --out", write=True)
    if target.exists():
      if not overwrite:
        raise FileExistsError(f"dataset already exists at {target} (pass overwrite=True / --overwrite)")
      paths.remove_tree(target)
    with tempfile.TemporaryDirectory() as local:
      built = _prepare(cls, local, name, overwrite, **kwargs)
      paths.copy_tree(built, target)
    return target
  if target.exists():
    if not overwrite:
      raise FileExistsError(f"dataset already exists at {target} (pass overwrite=True / --overwrite)")
    shutil.rmtree(target)
  builder = cls(data_dir=os.fspath(out_dir), config=tfds.core.BuilderConfig(name=name, version=VERSION),
                file_format="array_record", **kwargs)
  try:
    with tempfile.TemporaryDirectory() as downloads:
      builder.download_and_prepare(download_dir=downloads)
  except BaseException:
    if target.parent.is_dir() and not any(target.parent.iterdir()):
      target.parent.rmdir()  # no empty <name>/ left behind by a failed build
    raise
  return pathlib.Path(builder.data_dir)


def build_image_text(records: Iterable[Record], out_dir: str | os.PathLike, name: str, *,
                     encoding_format: str = "jpeg", image_size: int | None = None,
                     extra_features: Mapping[str, Any] | None = None, metadata: Mapping | None = None,
                     overwrite: bool = False) -> tuple[pathlib.Path, BuildReport]:
  """Write an ImageText dataset; returns (dataset dir, report). The report is also saved as build_report.json."""
  if encoding_format not in ENCODING_FORMATS:
    raise ValueError(f"encoding_format must be one of {ENCODING_FORMATS}, got {encoding_format!r}")
  if image_size is not None and image_size < 1:
    raise ValueError(f"image_size must be positive, got {image_size}")
  report = BuildReport()
  features = {"image": tfds.features.Image(shape=(None, None, 3), encoding_format=encoding_format),
              "caption": tfds.features.Text(), **(extra_features or {})}
  meta = {"image_size": image_size, **(metadata or {})}
  try:
    path = _prepare(ImageText, out_dir, name, overwrite, features=features, metadata=meta,
                    examples=lambda: image_text_examples(records, report, encoding_format, image_size),
                    description="image-caption pairs written by unclip_jax.data.builders")
  except AssertionError as e:  # tfds refuses an empty split; say why it was empty
    if report.written == 0:
      first = f", first: {report.skipped[0]}" if report.skipped else ""
      raise ValueError(f"no valid examples ({len(report.skipped)} records skipped{first})") from e
    raise
  (path / REPORT_FILE).write_text(json.dumps(report.to_json(), indent=1))
  msg = f"wrote {report.written} examples to {path}; skipped {len(report.skipped)}"
  if report.skipped:
    msg += f" (all listed in {path / REPORT_FILE}):"
    msg += "".join(f"\n  {s['key']}: {s['reason']}" for s in report.skipped[:PRINT_SKIPPED])
    if len(report.skipped) > PRINT_SKIPPED:
      msg += f"\n  ... and {len(report.skipped) - PRINT_SKIPPED} more"
  print(msg)
  return path, report


def build_embeddings(arrays: Mapping[str, np.ndarray], out_dir: str | os.PathLike, name: str, *,
                     captions: Sequence[str] | None = None, metadata: Mapping | None = None,
                     overwrite: bool = False) -> pathlib.Path:
  """arrays: {feature: [N, ...]} (e.g. text_embed [N, E], text_enc [N, 77, E], image_embed [N, E]).

  Rows keep their order (shuffling on write is disabled), so row i can be zipped with example i of another
  dataset read in index order. Tensors are stored as raw bytes with their dtype.
  """
  if not arrays:
    raise ValueError("no arrays given")
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  sizes = {k: v.shape[0] if v.ndim else None for k, v in arrays.items()}
  n = next(iter(sizes.values()))
  if None in sizes.values() or len(set(sizes.values())) != 1 or (captions is not None and len(captions) != n):
    raise ValueError(f"all arrays need the same leading size; got {sizes}"
                     + ("" if captions is None else f" and {len(captions)} captions"))
  if n == 0:
    raise ValueError("arrays are empty")
  features = {k: tfds.features.Tensor(shape=v.shape[1:], dtype=v.dtype, encoding=tfds.features.Encoding.BYTES)
              for k, v in arrays.items()}
  if captions is not None:
    if "caption" in features:
      raise ValueError("'caption' is both an array and the captions argument")
    features["caption"] = tfds.features.Text()

  def examples():
    for i in range(n):
      ex = {k: v[i] for k, v in arrays.items()}
      if captions is not None:
        ex["caption"] = captions[i]
      yield i, ex

  path = _prepare(Embeddings, out_dir, name, overwrite, features=features, metadata=metadata,
                  examples=examples, disable_shuffling=True,
                  description="precomputed embeddings written by unclip_jax.data.builders")
  print(f"wrote {n} rows of {sorted(arrays)} to {path}")
  return path
