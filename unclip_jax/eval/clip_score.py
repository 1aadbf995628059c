"""CLIP score of (image, prompt) pairs and CLIP image features, with any CLIP this package can load.

  CLIP score (Hessel et al. 2021 with w = 100; torchmetrics' `CLIPScore`): per pair
      s_i = 100 · max(cos(E_I(image_i), E_T(prompt_i)), 0)                 E_* = projected embeddings
  reported as the mean and std of s_i over the set (`clip_score`, `clip_score_std`). torchmetrics' code clamps the
  mean instead, max(mean_i 100·cos_i, 0) (`clip_score_torchmetrics`); the two differ only when a pair has cos < 0.

CLIP weights (`load_clip(path)`), one of:
  a bundle folder            its `clip` component (default: the embedded bundle, so everything works offline);
  a bundle component folder  config.json (stage "clip") + params.safetensors;
  a transformers CLIP folder config.json + model.safetensors / pytorch_model.bin (`save_pretrained` output, e.g.
                             openai/clip-vit-base-patch16 as Karlo reports, or ViT-L/14), converted on load; its
                             preprocessor_config.json (if any) sets the resize / crop sizes and the mean / std.
Images: CLIP preprocessing (`data/image_processing.py`: shortest side -> size with PIL bicubic, centre crop,
(x/255 - mean)/std), NHWC. Prompts: the CLIP BPE at the model's context length; longer prompts are truncated to
context_length - 2 tokens + BOS/EOS (counted in the report as `n_truncated`).

Batches of a fixed size (the last one padded) run under one jitted function, sharded by rows over the local devices
when the batch size divides by their number (as the pipeline does; on CPU one device), else replicated.

Image + prompt inputs (`read_pairs`):
  folder:   every image X.png (any IMAGE_EXTENSIONS) with X.json holding "prompt" (what `python -m unclip_jax.sample`
            writes; "caption" / "text" are accepted too) or X.txt; its `grid.png` is skipped;
  shards:   webdataset .tar (a file, a folder of them, or a glob) with key.png + key.json ("prompt") or key.txt;
  captions: `--captions FILE`, .jsonl (one {"file": ..., "caption": ...} object a line; "image" / "file_name" and
            "prompt" / "text" accepted) or .csv with a header naming such columns; files relative to the images
            folder (or matched by file name).

Importing this module does not import jax; `CLIPScorer` does when built.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import json
import logging
import os
import pathlib
import tarfile
import warnings
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from unclip_jax.eval import features as features_lib, images as images_lib

log = logging.getLogger(__name__)

CLIP_SCORE_SCALE = 100.0
PROMPT_KEYS = ("prompt", "caption", "text")
FILE_KEYS = ("file", "image", "file_name", "filename", "path")
SKIPPED_NAMES = ("grid.png",)  # sample.py's contact sheet, not a sample


def default_bundle_path() -> pathlib.Path:
  """The embedded default bundle (its small CLIP: 32² images, 16 tokens)."""
  return pathlib.Path(__file__).resolve().parent.parent / "assets" / "default_bundle"


class CLIPLoadError(ValueError):
  """A --clip path that is not a bundle, a bundle clip component or a transformers CLIP folder (names it)."""


class PairsError(ValueError):
  """An image without a prompt, an unreadable captions file, etc. (the message names the image / file / line)."""


# ---- loading a CLIP -----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LoadedCLIP:
  """A CLIP ready for evaluation.

  Attributes:
    config: models/clip.py CLIPConfig; params: float32 Linen params.
    kind: "bundle" | "component" | "transformers"; path: where it came from.
    resize_size / crop_size: CLIP preprocessing (shortest side, square crop); mean / std: per-channel statistics.
    fingerprint: sha256 prefix of the weights file (recorded in statistics caches).
  """
  config: Any
  params: Any
  kind: str
  path: str
  resize_size: int
  crop_size: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  fingerprint: str | None

  @property
  def context_length(self) -> int:
    return self.config.text.context_length

  @property
  def embed_dim(self) -> int:
    return self.config.projection_dim or self.config.vision.width


def _hf_preprocessing(folder: pathlib.Path, image_size: int) -> tuple[int, int, tuple, tuple]:
  from unclip_jax.data import image_processing

  mean, std = image_processing.OPENAI_CLIP_MEAN, image_processing.OPENAI_CLIP_STD
  path = folder / "preprocessor_config.json"
  if not path.is_file():
    return image_size, image_size, mean, std
  try:
    d = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise CLIPLoadError(f"cannot read {path}: {e}") from e
  size, crop = d.get("size", image_size), d.get("crop_size", image_size)
  if isinstance(size, dict):
    size = size.get("shortest_edge", size.get("height", image_size))
  if isinstance(crop, dict):
    crop = crop.get("height", image_size)
  if not d.get("do_center_crop", True):
    crop = size
  return int(size), int(crop), tuple(d.get("image_mean", mean)), tuple(d.get("image_std", std))


def _load_component_folder(folder: pathlib.Path):
  """config.json (stage "clip") + params.safetensors -> (CLIPConfig, params), checked like bundle.load_component."""
  from unclip_jax import bundle, config_lib
  from unclip_jax.convert import torch_layout
  from unclip_jax.stages import builders

  d = bundle.read_json(folder / bundle.CONFIG_NAME, "component config")
  if not isinstance(d, dict) or d.get("stage") != "clip":
    raise CLIPLoadError(f"{folder / bundle.CONFIG_NAME} is not a clip component config (stage "
                        f"{d.get('stage') if isinstance(d, dict) else None!r})")
  cfg = config_lib.complete(d)
  flat = torch_layout.read_safetensors(folder / bundle.PARAMS_NAME)
  params = bundle.unflatten_params({k: np.asarray(v).astype(np.float32, copy=False) for k, v in flat.items()})
  bundle.check_params(params, cfg, str(folder / bundle.PARAMS_NAME))
  return builders.clip_config(cfg.model), params


def load_clip(path: str | os.PathLike | None = None, *, verify: bool = True) -> LoadedCLIP:
  """A bundle folder, a bundle clip component folder or a transformers CLIP folder -> LoadedCLIP (None: embedded)."""
  from unclip_jax import bundle
  from unclip_jax.eval.features import file_fingerprint

  folder = pathlib.Path(path) if path is not None else default_bundle_path()
  if not folder.exists():
    raise CLIPLoadError(f"--clip: path not found: {folder}")
  if not folder.is_dir():
    raise CLIPLoadError(f"--clip must be a folder (a bundle, a bundle's clip component or a transformers CLIP "
                        f"save_pretrained folder), got the file {folder}")
  try:
    if (folder / "clip" / bundle.CONFIG_NAME).is_file():
      kind, weights = "bundle", folder / "clip" / bundle.PARAMS_NAME
      cfg, params = bundle.load_component(folder, "clip", verify=verify)
      from unclip_jax.stages import builders

      config = builders.clip_config(cfg.model)
    elif (folder / bundle.CONFIG_NAME).is_file() and (folder / bundle.PARAMS_NAME).is_file():
      kind, weights = "component", folder / bundle.PARAMS_NAME
      config, params = _load_component_folder(folder)
    elif (folder / "config.json").is_file():
      from unclip_jax.convert import clip as convert_clip

      kind = "transformers"
      weights = next((folder / n for n in (convert_clip.SAFETENSORS_NAME, convert_clip.TORCH_NAME)
                      if (folder / n).is_file()), None)
      config, params = convert_clip.load_hf_clip(str(folder))
    else:
      raise CLIPLoadError(f"--clip {folder}: no clip/config.json (bundle), config.json + params.safetensors "
                          "(bundle component) or config.json + model.safetensors (transformers CLIP)")
  except (FileNotFoundError, KeyError) as e:
    raise CLIPLoadError(f"--clip {folder}: {e}") from e
  except CLIPLoadError:
    raise
  except ValueError as e:
    raise CLIPLoadError(f"--clip {folder}: {e}") from e
  if config.vision is None or config.text is None:
    raise CLIPLoadError(f"--clip {folder}: a CLIP score needs both towers; this CLIP has "
                        f"{'no image tower' if config.vision is None else 'no text tower'}")
  if kind == "transformers":
    size, crop, mean, std = _hf_preprocessing(folder, config.vision.image_size)
  else:
    from unclip_jax.data import image_processing

    size = crop = config.vision.image_size
    mean, std = image_processing.OPENAI_CLIP_MEAN, image_processing.OPENAI_CLIP_STD
  if crop != config.vision.image_size:
    raise CLIPLoadError(f"--clip {folder}: crop size {crop} differs from the model's image size "
                        f"{config.vision.image_size}")
  return LoadedCLIP(config=config, params=params, kind=kind, path=str(folder), resize_size=size, crop_size=crop,
                    mean=tuple(mean), std=tuple(std), fingerprint=file_fingerprint(weights) if weights else None)


# ---- the jitted, sharded scorer -----------------------------------------------------------------------------------
class CLIPScorer:
  """Batched CLIP embeddings and scores on every local device.

  `images` are uint8 RGB [H, W, 3] of any size; every device call has `batch_size` rows (the last batch is padded).
  """

  def __init__(self, clip: LoadedCLIP, batch_size: int = 64, devices: Sequence[Any] | None = None):
    import jax

    from unclip_jax.data.tokenizer import CLIPTokenizer
    from unclip_jax.inference.pipeline import data_mesh, default_devices

    if batch_size < 1:
      raise ValueError(f"batch size must be >= 1, got {batch_size}")
    self.clip, self.batch_size = clip, batch_size
    self.mesh = data_mesh(default_devices() if devices is None else list(devices))
    n = self.mesh.size
    spec = jax.sharding.PartitionSpec("data") if batch_size % n == 0 else jax.sharding.PartitionSpec()
    if batch_size % n:
      warnings.warn(f"batch size {batch_size} does not divide over {n} devices: every device computes every row "
                    f"(use a multiple of {n})", stacklevel=2)
    self.sharded = batch_size % n == 0
    self._rows = jax.sharding.NamedSharding(self.mesh, spec)
    self.params = jax.device_put(clip.params, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
    self.tokenizer = CLIPTokenizer(context_length=clip.context_length)
    self._image_embeds, self._scores = _jitted(clip.config)

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  def preprocess(self, image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [S, S, 3] CLIP pixels."""
    from unclip_jax.data import image_processing

    return image_processing.preprocess(image, size=self.clip.resize_size, crop_size=self.clip.crop_size,
                                       mean=self.clip.mean, std=self.clip.std)[0]

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, int]:
    """prompts -> (ids int32 [B, context_length], number truncated); truncation is counted, not warned per prompt."""
    tok_log = logging.getLogger("unclip_jax.data.tokenizer")
    level = tok_log.level
    tok_log.setLevel(logging.ERROR)
    try:
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids, _ = self.tokenizer.tokenize(list(prompts))
    finally:
      tok_log.setLevel(level)
    n_truncated = sum("truncated to the context length" in str(w.message) for w in caught)
    return ids, n_truncated

  def _pad(self, x: np.ndarray) -> np.ndarray:
    if x.shape[0] < self.batch_size:
      x = np.concatenate([x, np.repeat(x[:1], self.batch_size - x.shape[0], axis=0)])
    return x

  def image_embeds_batch(self, pixels: np.ndarray):
    """float32 [b <= batch_size, S, S, 3] CLIP pixels -> device array [batch_size, E] (padding rows at the end)."""
    import jax

    return self._image_embeds(self.params, jax.device_put(self._pad(pixels), self._rows))

  def scores_batch(self, pixels: np.ndarray, ids: np.ndarray):
    """CLIP pixels [b, S, S, 3], ids [b, T] -> device array [batch_size] of 100·cos (padding rows at the end)."""
    import jax

    return self._scores(self.params, jax.device_put(self._pad(pixels), self._rows),
                        jax.device_put(self._pad(np.asarray(ids, np.int32)), self._rows))

  def score_pairs(self, pairs: Iterable[tuple[str, np.ndarray, str]], progress: bool = False,
                  total: int | None = None) -> tuple[np.ndarray, int]:
    """(name, uint8 [H, W, 3], prompt) triples -> (100·cos [N] float64, unclamped, in order; n truncated prompts)."""
    import sys

    out: list[np.ndarray] = []
    pending = None
    n_truncated = done = 0
    for chunk in features_lib.chunks(pairs, self.batch_size):
      pixels = []
      for name, image, _ in chunk:
        try:
          pixels.append(self.preprocess(image))
        except ValueError as e:
          raise PairsError(f"cannot preprocess image {name}: {e}") from e
      ids, k = self.tokenize([p for _, _, p in chunk])
      n_truncated += k
      result = self.scores_batch(np.stack(pixels), ids)
      if pending is not None:
        out.append(np.asarray(pending[0], np.float64)[:pending[1]])
      pending = (result, len(chunk))
      done += len(chunk)
      if progress:
        print(f"\rclip-score: {done}/{total if total is not None else '?'}", end="", file=sys.stderr, flush=True)
    if pending is not None:
      out.append(np.asarray(pending[0], np.float64)[:pending[1]])
    if progress:
      print(file=sys.stderr)
    return (np.concatenate(out) if out else np.zeros((0,), np.float64)), n_truncated


@functools.lru_cache(maxsize=8)
def _jitted(config):
  """(image_embeds(params, pixels [B, S, S, 3]) -> [B, E], scores(params, pixels, ids [B, T]) -> [B] 100·cos),
  jitted once per CLIPConfig (params are an argument, not constants)."""
  import jax
  import jax.numpy as jnp

  from unclip_jax.models.clip import CLIP

  model = CLIP(config)

  def image_embeds(p, px):
    return model.apply({"params": p}, px, method=model.encode_image)[0].astype(jnp.float32)

  def scores(p, px, ids):
    img = image_embeds(p, px)
    txt = model.apply({"params": p}, ids, method=model.encode_text)[0].astype(jnp.float32)
    return CLIP_SCORE_SCALE * jnp.sum(_l2n(img) * _l2n(txt), axis=-1)

  return jax.jit(image_embeds), jax.jit(scores)


def _l2n(x):
  import jax
  import jax.numpy as jnp

  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def summarize(raw: np.ndarray) -> dict[str, float]:
  """100·cos per pair [N] -> {"clip_score": mean 100·max(cos, 0), "clip_score_std", "clip_score_torchmetrics"}."""
  raw = np.asarray(raw, np.float64)
  if raw.size == 0:
    raise ValueError("no (image, prompt) pairs to score")
  clamped = np.maximum(raw, 0.0)
  return {"clip_score": float(clamped.mean()), "clip_score_std": float(clamped.std()),
          "clip_score_torchmetrics": float(max(raw.mean(), 0.0)), "cos_min": float(raw.min() / CLIP_SCORE_SCALE),
          "n_negative": int((raw < 0).sum())}


# ---- (image, prompt) inputs ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Pairs:
  """Images with their prompts: `source` (images.ImageSource, in its order) and `prompts[i]` for its i-th image."""
  source: images_lib.ImageSource
  prompts: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.prompts)

  def __iter__(self) -> Iterator[tuple[str, np.ndarray, str]]:
    for (name, image), prompt in zip(self.source, self.prompts):
      yield name, image, prompt


def _prompt_from_json(text: str, where: str) -> str:
  try:
    d = json.loads(text)
  except json.JSONDecodeError as e:
    raise PairsError(f"{where}: not valid JSON: {e}") from e
  if isinstance(d, dict):
    for k in PROMPT_KEYS:
      if isinstance(d.get(k), str):
        return d[k]
  raise PairsError(f"{where} has no \"prompt\" field (a string; \"caption\" / \"text\" are accepted too)")


def _sidecar_prompt(image_path: str) -> str:
  stem = os.path.splitext(image_path)[0]
  if os.path.isfile(stem + ".json"):
    with open(stem + ".json", encoding="utf-8") as f:
      return _prompt_from_json(f.read(), stem + ".json")
  if os.path.isfile(stem + ".txt"):
    with open(stem + ".txt", encoding="utf-8") as f:
      return f.read().strip()
  raise PairsError(f"no prompt for image {image_path}: expected {os.path.basename(stem)}.json with a \"prompt\" "
                   "field (as `python -m unclip_jax.sample` writes) or a .txt, or pass --captions FILE")


def _shard_prompts(shard: str, members: Sequence[str]) -> list[str]:
  """Prompts of a webdataset shard's image members, from key.json ("prompt") / key.txt."""
  texts: dict[str, tuple[str, str]] = {}
  try:
    with tarfile.open(shard) as tf:
      for m in tf:
        key, ext = os.path.splitext(m.name)
        ext = ext.lower()
        if m.isfile() and ext in (".json", ".txt") and texts.get(key, ("",))[0] != ".json":
          texts[key] = (ext, tf.extractfile(m).read().decode("utf-8"))  # key.json wins over key.txt
  except (tarfile.TarError, OSError, UnicodeDecodeError) as e:
    raise PairsError(f"cannot read shard {shard}: {e}") from e
  out = []
  for name in members:
    key = os.path.splitext(name)[0]
    if key not in texts:
      raise PairsError(f"no prompt for image {shard}:{name}: the shard has no {key}.json (with \"prompt\") or "
                       f"{key}.txt")
    ext, text = texts[key]
    out.append(_prompt_from_json(text, f"{shard}:{key}.json") if ext == ".json" else text.strip())
  return out


def read_captions_file(path: str) -> dict[str, str]:
  """.jsonl / .csv captions file -> {file: caption}."""
  if not os.path.isfile(path):
    raise PairsError(f"--captions: file not found: {path}")
  rows: list[tuple[int, dict]] = []
  try:
    with open(path, encoding="utf-8", newline="") as f:
      if path.lower().endswith(".csv"):
        rows = list(enumerate(csv.DictReader(f), start=2))
      else:
        for i, line in enumerate(f, start=1):
          if line.strip():
            try:
              rows.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
              raise PairsError(f"--captions {path} line {i}: not valid JSON ({e}); use .jsonl or .csv") from e
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise PairsError(f"--captions {path}: {e}") from e
  out: dict[str, str] = {}
  for line, row in rows:
    if not isinstance(row, dict):
      raise PairsError(f"--captions {path} line {line}: expected an object with file and caption fields")
    file = next((row[k] for k in FILE_KEYS if isinstance(row.get(k), str) and row[k]), None)
    caption = next((row[k] for k in ("caption",) + PROMPT_KEYS if isinstance(row.get(k), str)), None)
    if file is None or caption is None:
      raise PairsError(f"--captions {path} line {line}: needs a file column ({' / '.join(FILE_KEYS)}) and a "
                       f"caption column (caption / prompt / text); got {sorted(row)}")
    out[file] = caption
  if not out:
    raise PairsError(f"--captions {path} holds no captions")
  return out


def read_pairs(images: str, captions: str | None = None) -> Pairs:
  """Images (folder / shards / glob) + prompts (sidecars, shard members or a captions file) -> Pairs."""
  try:
    source = images_lib.open_images(images)
  except images_lib.ImageSourceError as e:
    raise PairsError(f"--images: {e}") from e
  files = tuple(f for f in source.files if os.path.basename(f) not in SKIPPED_NAMES or captions is not None)
  if len(files) != len(source.files):
    log.info("skipping %d grid.png file(s)", len(source.files) - len(files))
    source = dataclasses.replace(source, files=files)
  if not len(source):
    raise PairsError(f"--images {images}: no images besides grid.png")
  if captions is not None:
    table = read_captions_file(captions)
    by_name: dict[str, list[str]] = {}
    for k in table:
      by_name.setdefault(os.path.basename(k), []).append(k)
    root = images if os.path.isdir(images) else os.path.dirname(images)
    prompts = []
    names = list(source.files) + [f"{s}:{m}" for s, ms in source.shards for m in ms]
    for name in names:
      rel = os.path.relpath(name, root) if name in source.files else name.split(":", 1)[1]
      hit = table.get(rel, table.get(name))
      if hit is None:
        cands = by_name.get(os.path.basename(rel), [])
        if len(cands) == 1:
          hit = table[cands[0]]
        elif len(cands) > 1:
          raise PairsError(f"--captions {captions}: image {name} matches several entries by file name "
                           f"({', '.join(cands[:3])}); give paths relative to {root}")
      if hit is None:
        raise PairsError(f"no caption for image {name} in --captions {captions} (looked up {rel!r} and its file "
                         "name)")
      prompts.append(hit)
    if len(table) > len(names):
      log.info("--captions has %d entries for %d images", len(table), len(names))
    return Pairs(source, tuple(prompts))
  prompts = [_sidecar_prompt(f) for f in source.files]
  for shard, members in source.shards:
    prompts += _shard_prompts(shard, members)
  return Pairs(source, tuple(prompts))


def clip_score(images: Sequence[np.ndarray], prompts: Sequence[str], clip: LoadedCLIP | None = None,
               batch_size: int = 64) -> dict[str, Any]:
  """In-memory CLIP score: uint8 images [H, W, 3] and their prompts -> summary dict plus "scores" [N] (100·cos)."""
  if len(images) != len(prompts):
    raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
  scorer = CLIPScorer(clip or load_clip(), batch_size=batch_size)
  raw, n_trunc = scorer.score_pairs((str(i), im, p) for i, (im, p) in enumerate(zip(images, prompts)))
  return {**summarize(raw), "n": int(raw.size), "n_truncated": n_trunc, "scores": raw}

