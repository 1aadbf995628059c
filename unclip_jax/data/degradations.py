"""Training inputs of the upsamplers: random crops and low-resolution degradations, in jax, driven by a key.

DALL-E 2 (§C of the paper) trains the upsamplers on random crops of 1/4 of the target size (they are conv-only, so
they run at full size at sampling time) and corrupts the conditioning image: Gaussian blur for 64->256, a
"BSR"-style mix (Zhang et al. 2021, BSRGAN) for 256->1024. Everything here has static shapes and jits; each
sample draws its own parameters from its own key.

  hr crop   [B, c, c, C]            c = crop_fraction · image_size, random window per sample
  low_res   [B, c/s, c/s, C]        s = image_size / low_res_size
    "blur":  resize(hr crop, antialiased bicubic), then with prob p a Gaussian blur, σ ~ U(σ_min, σ_max)
    "bsr":   in a random order, each with its own probability: Gaussian blur (σ ~ U), a down-and-up resize by
             f ~ U(f_min, 1) with a random kernel, additive Gaussian noise (std ~ U); then the resize to the low
             resolution with a random kernel; then JPEG-like quantization (8x8 block DCT of YCbCr with the JPEG
             tables at quality q ~ U(q_min, q_max)); clipped to [-1, 1].

Images are float in [-1, 1], NHWC.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

RESIZE_METHODS = ("linear", "cubic", "lanczos3")
DEGRADATIONS = ("none", "blur", "bsr")


# ---- primitives -----------------------------------------------------------------------------------------------
def gaussian_kernel1d(sigma: jax.Array, size: int) -> jax.Array:
  """Normalized 1-D Gaussian taps [size] (odd size); sigma may be traced (σ <= 1e-3 gives a delta)."""
  if size % 2 != 1:
    raise ValueError(f"blur kernel size must be odd, got {size}")
  x = jnp.arange(size, dtype=jnp.float32) - size // 2
  w = jnp.exp(-0.5 * (x / jnp.maximum(sigma, 1e-3)) ** 2)
  return w / w.sum()


def gaussian_blur(image: jax.Array, sigma: jax.Array, size: int) -> jax.Array:
  """Separable Gaussian blur with mirror ('reflect') padding.  [H, W, C], scalar σ -> [H, W, C]."""
  k, p = gaussian_kernel1d(sigma, size), size // 2
  x = jnp.pad(image, ((p, p), (p, p), (0, 0)), mode="reflect")
  h, w = image.shape[:2]
  x = sum(k[i] * x[i:i + h] for i in range(size))                          # along H
  return sum(k[i] * x[:, i:i + w] for i in range(size))                     # along W


def resize_random_method(image: jax.Array, shape: tuple[int, int], index: jax.Array,
                         scale: jax.Array | None = None) -> jax.Array:
  """Resizes [H, W, C] to `shape` with RESIZE_METHODS[index] (antialiased); `scale` (traced) instead resizes the
  content by that factor inside a fixed-size output (used for down-and-up resizes)."""
  def one(method):
    def f(x):
      if scale is None:
        return jax.image.resize(x, (*shape, x.shape[-1]), method=method, antialias=True)
      s = jnp.stack([scale, scale]).astype(jnp.float32)
      return jax.image.scale_and_translate(x, (*shape, x.shape[-1]), (0, 1), s, jnp.zeros(2), method=method,
                                           antialias=True)
    return f
  return jax.lax.switch(index, [one(m) for m in RESIZE_METHODS], image)


def down_up(image: jax.Array, factor: jax.Array, index_down: jax.Array, index_up: jax.Array,
            pad: int = 8) -> jax.Array:
  """Resizes [H, W, C] down by `factor` (in [0.5, 1], traced) and back to H x W; the content keeps its geometry.

  The image is edge-padded by `pad` pixels first (>= 2·kernel radius / factor), so the zeros that
  scale_and_translate leaves outside the shrunk content never reach the kept pixels.
  """
  h, w = image.shape[:2]
  x = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
  hp, wp = x.shape[:2]
  small = resize_random_method(x, (hp, wp), index_down, factor)          # content in the top-left f·H x f·W
  return resize_random_method(small, (hp, wp), index_up, 1.0 / factor)[pad:pad + h, pad:pad + w]


_JPEG_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], np.float32).reshape(8, 8)
_JPEG_CHROMA = np.full((8, 8), 99.0, np.float32)
_JPEG_CHROMA[:4, :4] = np.array([17, 18, 24, 47, 18, 21, 26, 66, 24, 26, 56, 99, 47, 66, 99, 99]).reshape(4, 4)
_RGB_TO_YCBCR = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
                         np.float32)


def dct_matrix(n: int = 8) -> np.ndarray:
  """Orthonormal DCT-II matrix [n, n]: X = D @ x."""
  k, i = np.arange(n)[:, None], np.arange(n)[None, :]
  d = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
  d[0] /= np.sqrt(2.0)
  return d.astype(np.float32)


def jpeg_tables(quality: jax.Array) -> jax.Array:
  """[3, 8, 8] quantization tables (Y, Cb, Cr) of libjpeg's quality scaling; quality in [1, 100] may be traced."""
  q = jnp.clip(quality, 1.0, 100.0)
  scale = jnp.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)
  tables = jnp.stack([_JPEG_LUMA, _JPEG_CHROMA, _JPEG_CHROMA])
  return jnp.clip(jnp.floor((tables * scale + 50.0) / 100.0), 1.0, 255.0)


def jpeg_quantize(image: jax.Array, quality: jax.Array) -> jax.Array:
  """JPEG-like compression artefacts without entropy coding: RGB [-1,1] -> YCbCr -> 8x8 block DCT -> round to the
  quality-scaled tables -> inverse. No chroma subsampling.  [H, W, 3] -> [H, W, 3] in [-1, 1]."""
  h, w, c = image.shape
  if c != 3:
    raise ValueError(f"jpeg_quantize needs RGB [H, W, 3], got {image.shape}")
  ph, pw = -h % 8, -w % 8
  x = jnp.pad((image + 1.0) * 127.5, ((0, ph), (0, pw), (0, 0)), mode="edge")
  ycc = x @ _RGB_TO_YCBCR.T + jnp.array([0.0, 128.0, 128.0])
  ycc = ycc - 128.0
  hh, ww = x.shape[:2]
  blocks = ycc.reshape(hh // 8, 8, ww // 8, 8, 3).transpose(0, 2, 4, 1, 3)              # [h8, w8, 3, 8, 8]
  d = jnp.asarray(dct_matrix())
  coef = jnp.einsum("ij,...jk,lk->...il", d, blocks, d)
  q = jpeg_tables(quality)
  coef = jnp.round(coef / q) * q
  blocks = jnp.einsum("ji,...jk,kl->...il", d, coef, d)
  ycc = blocks.transpose(0, 3, 1, 4, 2).reshape(hh, ww, 3) + 128.0
  rgb = (ycc - jnp.array([0.0, 128.0, 128.0])) @ np.linalg.inv(_RGB_TO_YCBCR).T.astype(np.float32)
  return jnp.clip(rgb[:h, :w] / 127.5 - 1.0, -1.0, 1.0)


def random_crop(key: jax.Array, images: jax.Array, size: int) -> jax.Array:
  """A random size x size window per sample.  [B, H, W, C] -> [B, size, size, C]."""
  b, h, w, c = images.shape
  if size > h or size > w:
    raise ValueError(f"crop size {size} exceeds the image size {h}x{w}")
  ky, kx = jax.random.split(key)
  ys = jax.random.randint(ky, (b,), 0, h - size + 1)
  xs = jax.random.randint(kx, (b,), 0, w - size + 1)
  crop = lambda img, y, x: jax.lax.dynamic_slice(img, (y, x, 0), (size, size, c))
  return jax.vmap(crop)(images, ys, xs)


# ---- degradations ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BlurSettings:
  """64->256: antialiased bicubic downsample, then with probability `prob` a Gaussian blur."""
  prob: float = 0.5
  sigma: tuple[float, float] = (0.4, 0.6)
  kernel_size: int = 3


@dataclasses.dataclass(frozen=True)
class BSRSettings:
  """256->1024: BSR-style random mix (see the module docstring)."""
  blur_prob: float = 0.7
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  blur_kernel_size: int = 7
  resize_prob: float = 0.5
  resize_factor: tuple[float, float] = (0.5, 1.0)
  noise_prob: float = 0.7
  noise_std: tuple[float, float] = (1.0 / 255 * 2, 25.0 / 255 * 2)   # in [-1, 1] units
  jpeg_prob: float = 0.9
  jpeg_quality: tuple[float, float] = (30.0, 95.0)


def _uniform(key, bounds):
  return jax.random.uniform(key, (), minval=bounds[0], maxval=bounds[1])


def degrade_blur(key: jax.Array, hr: jax.Array, low_size: int, s: BlurSettings = BlurSettings()) -> jax.Array:
  """One sample: [c, c, C] -> [low_size, low_size, C]."""
  k_apply, k_sigma = jax.random.split(key)
  low = jax.image.resize(hr, (low_size, low_size, hr.shape[-1]), "bicubic", antialias=True)
  blurred = gaussian_blur(low, _uniform(k_sigma, s.sigma), s.kernel_size)
  return jnp.where(jax.random.bernoulli(k_apply, s.prob), blurred, low)


def degrade_bsr(key: jax.Array, hr: jax.Array, low_size: int, s: BSRSettings = BSRSettings()) -> jax.Array:
  """One sample: [c, c, C] -> [low_size, low_size, C]."""
  keys = jax.random.split(key, 8)

  def blur(x, k):
    k1, k2 = jax.random.split(k)
    return jnp.where(jax.random.bernoulli(k1, s.blur_prob),
                     gaussian_blur(x, _uniform(k2, s.blur_sigma), s.blur_kernel_size), x)

  def resize(x, k):
    k1, k2, k3, k4 = jax.random.split(k, 4)
    y = down_up(x, _uniform(k2, s.resize_factor), jax.random.randint(k3, (), 0, len(RESIZE_METHODS)),
                jax.random.randint(k4, (), 0, len(RESIZE_METHODS)))
    return jnp.where(jax.random.bernoulli(k1, s.resize_prob), y, x)

  def noise(x, k):
    k1, k2, k3 = jax.random.split(k, 3)
    y = x + _uniform(k2, s.noise_std) * jax.random.normal(k3, x.shape)
    return jnp.where(jax.random.bernoulli(k1, s.noise_prob), y, x)

  ops = (blur, resize, noise)
  order = jax.random.permutation(keys[0], len(ops))
  x = hr
  for i in range(len(ops)):
    x = jax.lax.switch(order[i], [functools.partial(op, k=keys[1 + i]) for op in ops], x)
  low = resize_random_method(x, (low_size, low_size), jax.random.randint(keys[5], (), 0, len(RESIZE_METHODS)))
  low = jnp.clip(low, -1.0, 1.0)
  jpeg = jpeg_quantize(low, _uniform(keys[6], s.jpeg_quality))
  return jnp.where(jax.random.bernoulli(keys[7], s.jpeg_prob), jpeg, low)


def degrade(key: jax.Array, hr: jax.Array, low_size: int, kind: str, settings=None) -> jax.Array:
  """Batch: [B, c, c, C] -> [B, low_size, low_size, C], one key per sample."""
  if kind not in DEGRADATIONS:
    raise ValueError(f"unknown degradation {kind!r}; choose one of {DEGRADATIONS}")
  if kind == "none":
    return jax.image.resize(hr, (hr.shape[0], low_size, low_size, hr.shape[-1]), "bicubic", antialias=True)
  fn = {"blur": degrade_blur, "bsr": degrade_bsr}[kind]
  settings = settings if settings is not None else {"blur": BlurSettings(), "bsr": BSRSettings()}[kind]
  keys = jax.random.split(key, hr.shape[0])
  return jax.vmap(lambda k, x: fn(k, x, low_size, settings))(keys, hr)


def training_pair(key: jax.Array, images: jax.Array, *, image_size: int, low_res_size: int,
                  crop_fraction: float = 0.25, degradation: str = "blur", settings=None):
  """Upsampler training example from full-size images.

  Args:
    images: [B, image_size, image_size, C] in [-1, 1].
    crop_fraction: crop side as a fraction of image_size (1/4 in DALL-E 2); 1.0 disables cropping.
  Returns:
    (target [B, c, c, C], low_res [B, c·low_res_size/image_size, ..., C]); feed `low_res` to `unet.model_input`.
  """
  b, h, w, _ = images.shape
  if (h, w) != (image_size, image_size):
    raise ValueError(f"images must be {image_size}x{image_size}, got {h}x{w}")
  if image_size % low_res_size:
    raise ValueError(f"image_size {image_size} must be a multiple of low_res_size {low_res_size}")
  scale = image_size // low_res_size
  crop = int(round(image_size * crop_fraction))
  if crop % scale or crop <= 0:
    raise ValueError(f"crop size {crop} (= {crop_fraction} x {image_size}) must be a positive multiple of the "
                     f"scale factor {scale}")
  k_crop, k_deg = jax.random.split(key)
  target = random_crop(k_crop, images, crop) if crop < image_size else images
  return target, degrade(k_deg, target, crop // scale, degradation, settings)


def training_pair_from_config(cfg):
  """`configs/upsampler.py` -> `fn(key, images) -> (target, low_res)`."""
  return functools.partial(training_pair, image_size=cfg.model.image_size, low_res_size=cfg.model.low_res_size,
                           crop_fraction=cfg.crop_fraction, degradation=cfg.degradation)
