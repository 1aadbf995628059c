"""What every stage module shares: the training `Task`, dataset iterators, text conditioning and its null, the
sampler settings, and the UNet's conditioning inputs.

Every stage reads array_record datasets written by `unclip_jax.data.build` (images + captions) and, for the
prior and the decoder, the CLIP embeddings precomputed once for the same examples (zipped by index).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion import samplers
from unclip_jax.diffusion.gaussian import GaussianDiffusion

Params = Any
IMAGE_CHANNELS = 3
EMBEDDING_KEYS = ("image_emb", "text_emb", "text_enc", "text_mask")
NULL_TEXTS = ("zeros", "empty_prompt")        # config `null_text` of the prior and the decoder


# ---- training -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Task:
  """What a stage supplies to `train.loop.train`.

  Attributes:
    init_params: rng -> parameter tree (kernels may be `nn.Partitioned`-boxed with logical axis names).
    loss_fn: (params, batch, rng) -> (scalar loss, dict of scalar metrics); pure.
    data: iterator of per-host numpy batches (dicts of arrays with a leading batch axis). If it has
      `get_state()`/`set_state(state)` (grain iterators do), its position is checkpointed and restored.
    examples_per_batch: global examples per step, for examples/s (default: leading dim × process count).
    evaluate: optional params -> {name: scalar or image batch [N, H, W, 3] in [-1, 1]}, run with the EMA params
      every `cfg.eval_every` steps and at the end; scalars are logged as eval/<name>, image batches written as
      grids to WORKDIR/samples/<name>_<step>.png and TensorBoard. Every process calls it (it may be jitted over
      sharded params); only process 0 writes.
  """
  init_params: Callable[[jax.Array], Any]
  loss_fn: Callable[..., tuple[jax.Array, dict]]
  data: Iterator[dict[str, np.ndarray]]
  examples_per_batch: int | None = None
  evaluate: Callable[[Any], dict[str, Any]] | None = None


class MappedIterator:
  """Applies `fn` to every batch of a (checkpointable) iterator; position state passes through."""

  def __init__(self, it, fn: Callable[[dict], dict]):
    self._it, self._fn = it, fn

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return self._fn(next(self._it))

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state) -> None:
    self._it.set_state(state)


def data_iterator(cfg, image_size: int | None) -> Iterator[dict]:
  """Per-host batches of the config's datasets (`data.dirs`, zipped by index)."""
  from unclip_jax.data import pipeline

  if not cfg.data.dirs:
    raise ValueError(f"stage {cfg.stage!r} needs data: set --config.data.dirs to dataset directories "
                     "written by `python -m unclip_jax.data.build`")
  per_host = pipeline.per_host_batch_size(cfg.batch_size, jax.process_count())
  ds = pipeline.make_dataset(list(cfg.data.dirs), batch_size=per_host, seed=cfg.seed, split=cfg.data.split,
                             image_size=image_size, max_scale=cfg.data.max_scale,
                             process_index=jax.process_index(), process_count=jax.process_count())
  return pipeline.make_iterator(ds, workers=cfg.data.workers)


def select(batch: dict, keys) -> dict:
  """The named fields of a host batch as numpy arrays; a KeyError names the missing ones."""
  missing = [k for k in keys if k not in batch]
  if missing:
    raise KeyError(f"dataset batches lack {missing}; they have {sorted(batch)}")
  return {k: np.asarray(batch[k]) for k in keys}


def eval_batch(cfg, data: Iterator[dict] | None, image_size: int | None, keys) -> dict | None:
  """`cfg.eval_examples` held examples for the periodic evaluation (None when evaluation is off).

  Taken from a second pass over the data with another shuffle seed (`data` overrides that, e.g. in tests)."""
  from unclip_jax.data import pipeline

  if int(cfg.eval_every) <= 0:
    return None
  if data is None:
    if not cfg.data.dirs:
      return None
    ds = pipeline.make_dataset(list(cfg.data.dirs), batch_size=int(cfg.eval_examples), seed=cfg.seed + 1,
                               split=cfg.data.split, image_size=image_size)
    data = pipeline.make_iterator(ds)
  batch = select(next(data), keys)
  return {k: v[:int(cfg.eval_examples)] for k, v in batch.items()}


def cosine(a, b) -> jax.Array:
  """Cosine similarity along the last axis.  [..., E], [..., E] -> [...] float32."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-12)


# ---- text conditioning --------------------------------------------------------------------------------------------
class TextCond(NamedTuple):
  """CLIP text conditioning of a batch (a pytree), as the prior and the decoder read it.

  emb: [B, E] pooled CLIP text embedding (diffusers `proj_embedding`, unnormalised `text_embeds`).
  enc: [B, L, E] CLIP text token states (`last_hidden_state`).
  mask: [B, L] bool, True on real tokens.
  """
  emb: jax.Array
  enc: jax.Array
  mask: jax.Array

  @property
  def batch(self) -> int:
    return self.emb.shape[0]


def zeros_null_text(batch: int, length: int, dim: int) -> TextCond:
  """The default null text of guidance training and sampling: zero embedding and token states, every token
  masked."""
  return TextCond(jnp.zeros((batch, dim), jnp.float32), jnp.zeros((batch, length, dim), jnp.float32),
                  jnp.zeros((batch, length), bool))


def broadcast_null(null: TextCond, batch: int, length: int, dim: int) -> TextCond:
  """A null given for one example ([E], [L, E], [L]), for batch 1, or for the whole batch -> [batch] rows.

  Raises a ValueError naming the field whose shape fits none of those."""
  def fix(x, shape, name):
    x = jnp.asarray(x)
    if x.ndim == len(shape) - 1:
      x = x[None]
    if x.ndim != len(shape) or x.shape[1:] != shape[1:] or x.shape[0] not in (1, batch):
      raise ValueError(f"null text {name} must be {list(shape[1:])} or {list(shape)}, got {tuple(x.shape)}")
    return jnp.broadcast_to(x, shape)
  if null.mask is None:
    raise ValueError(f"null text mask is required ([{length}] or [{batch}, {length}] bool)")
  return TextCond(fix(null.emb, (batch, dim), "embedding"), fix(null.enc, (batch, length, dim), "token states"),
                  fix(null.mask, (batch, length), "mask").astype(bool))


def check_null_text(choice: str) -> str:
  """Validates a config `null_text` value ("zeros" or "empty_prompt")."""
  if choice not in NULL_TEXTS:
    raise ValueError(f"unknown null_text {choice!r}; choose one of {NULL_TEXTS}")
  return choice


# ---- sampling -----------------------------------------------------------------------------------------------------
def sampler_settings(cfg) -> samplers.SamplerSettings:
  """SamplerSettings from a stage config's `sampling` block."""
  return samplers.SamplerSettings.from_config(cfg.sampling)


def check_output_channels(unet, diffusion: GaussianDiffusion, what: str) -> None:
  """The UNet's out_channels must be what the diffusion's variance needs (3, or 6 with a learned variance)."""
  want = diffusion.output_channels(IMAGE_CHANNELS)
  if unet.out_channels != want:
    raise ValueError(f"{what} out_channels={unet.out_channels} but variance {diffusion.variance!r} needs {want}")


def check_inpaint(x_T: jax.Array, image: jax.Array | None, mask: jax.Array | None):
  """Validates inpainting inputs against x_T [B, H, W, C]. Returns (image [B, H, W, C], mask [B, H, W, 1]) as
  float32, or (None, None)."""
  if (image is None) != (mask is None):
    raise ValueError("pass both inpaint_image and inpaint_mask, or neither")
  if image is None:
    return None, None
  b, hh, ww, c = x_T.shape
  if tuple(image.shape) != (b, hh, ww, c):
    raise ValueError(f"inpaint_image must be [B, H, W, C] = {[b, hh, ww, c]} (like x_T), got {tuple(image.shape)}")
  if tuple(mask.shape) not in ((b, hh, ww, 1), (b, hh, ww)):
    raise ValueError(f"inpaint_mask must be [B, H, W, 1] = {[b, hh, ww, 1]} or [B, H, W] = {[b, hh, ww]} "
                     f"(1 = known pixel), got {tuple(mask.shape)}")
  mask = mask.astype(jnp.float32)
  return image.astype(jnp.float32), (mask[..., None] if mask.ndim == 3 else mask)


# ---- UNet conditioning inputs -------------------------------------------------------------------------------------
def upsample_low_res(low_res: jax.Array, size: int | tuple[int, int], method: str = "bicubic") -> jax.Array:
  """Resizes the low-resolution condition to the target size.  [B, h, w, C] -> [B, H, W, C] float32.

  "bicubic" equals torch `interpolate(bicubic, align_corners=False, antialias=True)` (Karlo/diffusers);
  "bilinear" equals torch bilinear without antialias (GLIDE) when upsampling.
  """
  hh, ww = (size, size) if isinstance(size, int) else size
  b, _, _, c = low_res.shape
  return jax.image.resize(low_res.astype(jnp.float32), (b, hh, ww, c), method=method)


def model_input(x_t: jax.Array, *, conditioning: str = "none", low_res: jax.Array | None = None,
                inpaint_image: jax.Array | None = None, inpaint_mask: jax.Array | None = None,
                resize_method: str = "bicubic") -> jax.Array:
  """Builds the UNet input for a conditioning option; x_t [B, H, W, C] -> [B, H, W, input_channels(C, ...)].

  "low_res": cat([x_t, resize(low_res)]) (the low-res image AFTER the noisy input, as diffusers and Karlo).
  "inpaint": cat([x_t, image·mask, mask]) (GLIDE); zeros when image/mask are None.
  "inpaint_low_res": cat([x_t, image·mask, mask, resize(low_res)]).
  inpaint_image is [B, H, W, C]; inpaint_mask [B, H, W, 1] or [B, H, W], 1 = known pixel.
  """
  from unclip_jax.stages.builders import input_channels

  input_channels(x_t.shape[-1], conditioning)      # validates the name
  b, hh, ww, c = x_t.shape
  parts = [x_t.astype(jnp.float32)]
  if conditioning.startswith("inpaint"):
    if (inpaint_image is None) != (inpaint_mask is None):
      raise ValueError("pass both inpaint_image and inpaint_mask, or neither")
    if inpaint_image is None:
      parts += [jnp.zeros((b, hh, ww, c), jnp.float32), jnp.zeros((b, hh, ww, 1), jnp.float32)]
    else:
      mask = inpaint_mask.astype(jnp.float32)
      mask = mask[..., None] if mask.ndim == 3 else mask
      if inpaint_image.shape != x_t.shape or mask.shape != (b, hh, ww, 1):
        raise ValueError(f"inpaint_image must be {x_t.shape} and inpaint_mask [{b}, {hh}, {ww}(, 1)]; got "
                         f"{inpaint_image.shape} and {inpaint_mask.shape}")
      parts += [inpaint_image.astype(jnp.float32) * mask, mask]
  if conditioning.endswith("low_res"):
    if low_res is None or low_res.ndim != 4 or low_res.shape[0] != b or low_res.shape[-1] != c:
      raise ValueError(f"conditioning {conditioning!r} needs low_res [{b}, h, w, {c}], got "
                       f"{None if low_res is None else low_res.shape}")
    parts.append(upsample_low_res(low_res, (hh, ww), resize_method))
  return jnp.concatenate(parts, axis=-1)


def conditioning_of(unet, choices: tuple[str, ...], what: str) -> str:
  """Which of `choices` (conditioning names) the UNet's in_channels belong to; a ValueError lists them."""
  from unclip_jax.stages.builders import input_channels

  for name in choices:
    if unet.in_channels == input_channels(IMAGE_CHANNELS, name):
      return name
  options = ", ".join(f"{input_channels(IMAGE_CHANNELS, n)} ({n!r})" for n in choices)
  raise ValueError(f"{what} UNet has in_channels={unet.in_channels}; expected {options}")
