"""Feature extractors for distribution metrics, by name: a small registry so FID-style metrics can use any of them.

A `FeatureExtractor` turns uint8 RGB images [H, W, 3] into float64 features [N, dim]: `preprocess` (host, per
image) makes the network input, `apply_batch` (device, jitted, fixed batch shape) runs the network. Registered:

  "inception": the FID InceptionV3 pool3 features (2048-d), pytorch-fid's weights, under a resize protocol.
  "clip":      CLIP image embeddings (projected, unnormalized; clean-fid's CLIP mode) of any CLIP `eval.clip_score`
               loads (default: the embedded bundle's, so a CLIP-FD works offline).

A new extractor registers a factory with `@register_feature_extractor(name, feature_name)`; the `fid` CLI's
`--features` choices come from this registry.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import sys
from typing import Any, Callable, Iterable, Iterator

import numpy as np

_REGISTRY: dict[str, tuple[Callable[..., "FeatureExtractor"], str]] = {}


def register_feature_extractor(name: str, feature_name: str, replace: bool = False):
  """Decorator: register `factory(*, weights, protocol, batch_size, **options) -> FeatureExtractor` as `name`.

  `feature_name` is what statistics caches record (and are checked against) for this extractor.
  """
  def wrap(factory):
    if name in _REGISTRY and not replace:
      raise ValueError(f"feature extractor {name!r} is already registered")
    _REGISTRY[name] = (factory, feature_name)
    return factory
  return wrap


def available_feature_extractors() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def _lookup(name: str) -> tuple[Callable[..., "FeatureExtractor"], str]:
  if name not in _REGISTRY:
    raise ValueError(f"unknown feature extractor {name!r}; available: {', '.join(available_feature_extractors())}")
  return _REGISTRY[name]


def feature_name(name: str) -> str:
  """Registered extractor -> the feature name its statistics carry (e.g. "inception" -> "inception-v3-pool3")."""
  return _lookup(name)[1]


def build_feature_extractor(name: str, **options: Any) -> "FeatureExtractor":
  return _lookup(name)[0](**options)


@dataclasses.dataclass
class FeatureExtractor:
  """uint8 images -> features [N, dim] (float64).

  Attributes:
    name: the feature name recorded in statistics caches (e.g. "inception-v3-pool3").
    dim: feature width.
    protocol: the preprocessing protocol recorded in caches (caches with another protocol are refused).
    preprocess: uint8 [H, W, 3] -> float32 network input [h, w, c] (same shape for every image).
    apply_batch: float32 [B, h, w, c] -> [B, dim] (a jitted function; called with a fixed B).
    batch_size: B.
    fingerprint: identifies the weights (e.g. a sha256 prefix), recorded in caches; None when unknown.
  """
  name: str
  dim: int
  protocol: str
  preprocess: Callable[[np.ndarray], np.ndarray]
  apply_batch: Callable[[np.ndarray], Any]
  batch_size: int = 50
  fingerprint: str | None = None
  num_workers: int = dataclasses.field(default_factory=lambda: min(8, os.cpu_count() or 1))

  def extract(self, images: Iterable[tuple[str, np.ndarray]], total: int | None = None,
              progress: bool = False) -> np.ndarray:
    """(name, uint8 [H, W, 3]) pairs -> float64 features [N, dim], in input order.

    The last partial batch is padded (repeating its first image) to keep one compiled shape; padding rows are
    dropped. The host prepares batch k+1 while the device runs batch k.
    """
    out: list[np.ndarray] = []
    pending = None  # (device result, n valid rows)
    done = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, self.num_workers)) as pool:
      for batch in chunks(images, self.batch_size):
        xs = list(pool.map(lambda item: _preprocess_named(self.preprocess, item), batch))
        n = len(xs)
        xs += [xs[0]] * (self.batch_size - n)
        result = self.apply_batch(np.stack(xs))
        if pending is not None:
          out.append(np.asarray(pending[0], dtype=np.float64)[:pending[1]])
        pending = (result, n)
        done += n
        if progress:
          print(f"\r{self.name}: {done}/{total if total is not None else '?'} images", end="", file=sys.stderr,
                flush=True)
    if pending is not None:
      out.append(np.asarray(pending[0], dtype=np.float64)[:pending[1]])
    if progress:
      print(file=sys.stderr)
    if not out:
      return np.zeros((0, self.dim), np.float64)
    feats = np.concatenate(out, axis=0)
    if feats.shape[1] != self.dim:
      raise RuntimeError(f"{self.name} returned features of width {feats.shape[1]}, expected {self.dim}")
    return feats


def _preprocess_named(fn, item):
  name, image = item
  try:
    return fn(image)
  except Exception as e:
    raise ValueError(f"cannot preprocess image {name}: {e}") from e


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
  """Consecutive lists of `size` items (the last one shorter)."""
  if size < 1:
    raise ValueError(f"batch size must be >= 1, got {size}")
  chunk: list[Any] = []
  for item in items:
    chunk.append(item)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def file_fingerprint(path: str | os.PathLike, n_hex: int = 16) -> str:
  """sha256 prefix of a file's bytes (identifies the weights a statistics cache was computed with)."""
  import hashlib

  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()[:n_hex]


INCEPTION_FEATURES = "inception-v3-pool3"


@functools.lru_cache(maxsize=4)
def _jitted_inception(precision: Any):
  """One jitted `InceptionV3FID.apply(variables, x)` per precision (variables are an argument, not constants)."""
  import jax

  from unclip_jax.models.inception import InceptionV3FID

  model = InceptionV3FID() if precision is None else InceptionV3FID(precision=precision)
  return jax.jit(model.apply)


@register_feature_extractor("inception", INCEPTION_FEATURES)
def inception_feature_extractor(weights: str | os.PathLike | None = None, protocol: str = "clean",
                                batch_size: int = 50, variables: Any = None,
                                precision: Any = None) -> FeatureExtractor:
  """FID InceptionV3 pool3 features [N, 2048] from pytorch-fid's weights file (or converted `variables`)."""
  import jax

  from unclip_jax.convert import inception as inception_weights
  from unclip_jax.eval import protocols
  from unclip_jax.models.inception import POOL_DIM

  protocols.check_protocol(protocol)
  if variables is None:
    if weights is None:
      raise ValueError("the inception features need --inception-weights (pytorch-fid's "
                       f"{inception_weights.FID_WEIGHTS_NAME})")
    variables = inception_weights.load_inception_variables(weights)
    fingerprint = file_fingerprint(weights)
  else:
    fingerprint = None
  variables = jax.device_put(variables)
  jitted = _jitted_inception(precision)

  def forward(x):
    return jitted(variables, x)

  return FeatureExtractor(name=INCEPTION_FEATURES, dim=POOL_DIM, protocol=protocol,
                          preprocess=functools.partial(protocols.preprocess, protocol=protocol),
                          apply_batch=forward, batch_size=batch_size, fingerprint=fingerprint)


CLIP_FEATURES = "clip-image-embeds"


@register_feature_extractor("clip", CLIP_FEATURES)
def clip_feature_extractor(weights: str | os.PathLike | None = None, protocol: str = "clean",
                           batch_size: int = 50, clip: Any = None) -> FeatureExtractor:
  """CLIP image embeddings [N, E] (projected, unnormalized, as clean-fid's CLIP mode) of any loadable CLIP.

  `weights`: a bundle / bundle clip component / transformers CLIP folder (default: the embedded bundle's CLIP, so
  this works offline); or pass a loaded `clip` (eval.clip_score.LoadedCLIP). Images get CLIP's own preprocessing
  (shortest side -> image size, PIL bicubic, centre crop, mean/std), as clean-fid's CLIP features do; only the
  "clean" protocol is accepted (the Inception resize protocols do not apply).
  """
  from unclip_jax.eval import clip_score

  if protocol != "clean":
    raise ValueError(f"--features clip uses CLIP's own preprocessing (resize, centre crop); protocol {protocol!r} "
                     "does not apply, use --protocol clean")
  loaded = clip if clip is not None else clip_score.load_clip(weights)
  scorer = clip_score.CLIPScorer(loaded, batch_size=batch_size)

  def forward(x):
    return scorer.image_embeds_batch(np.asarray(x, np.float32))

  return FeatureExtractor(name=CLIP_FEATURES, dim=loaded.embed_dim, protocol=protocol, preprocess=scorer.preprocess,
                          apply_batch=forward, batch_size=batch_size, fingerprint=loaded.fingerprint)
