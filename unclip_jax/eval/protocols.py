"""The two resize/normalise protocols FID numbers are reported under: uint8 [H, W, 3] -> float32 [299, 299, 3].

  "clean" (clean-fid's `mode="clean"`, the default here): each channel of the uint8 image is resized as a float32
      PIL image (mode "F") with PIL's bicubic filter to 299x299 (PIL antialiases when downsampling), clipped to
      [0, 255], not re-quantised; then scaled as the TF graph does, (x - 128) / 128.
  "pytorch-fid" (pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)`): the image as float
      x / 255 in [0, 1] is resized to 299x299 with `F.interpolate(mode="bilinear", align_corners=False)` (no
      antialiasing: half-pixel centres, source index clamped at 0), then 2x - 1.

The two agree for images that are already 299x299 except for the final scaling (1/128 vs 2/255 around 128 vs
127.5); for other sizes they give different features, so FID numbers are only comparable under one protocol. The
network sees the image here (on the host, per image) rather than inside the jitted forward pass so that folders
of mixed sizes can be batched; the arithmetic is the same float32 interpolation.
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image

INCEPTION_SIZE = 299
PROTOCOLS = ("clean", "pytorch-fid")
DEFAULT_PROTOCOL = "clean"


def check_protocol(protocol: str) -> str:
  if protocol not in PROTOCOLS:
    raise ValueError(f"unknown FID protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
  return protocol


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
  return image


def clean_resize(image: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
  """clean-fid resize: uint8 [H, W, 3] -> float32 [size, size, 3] in [0, 255] (PIL bicubic per float channel)."""
  image = _as_rgb_uint8(image)
  channels = []
  for c in range(3):
    ch = Image.fromarray(image[:, :, c].astype(np.float32), mode="F")
    ch = ch.resize((size, size), resample=Image.BICUBIC)
    channels.append(np.asarray(ch, dtype=np.float32).clip(0, 255))
  return np.stack(channels, axis=-1)


@functools.lru_cache(maxsize=32)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] float32 weights of torch's 1-D linear interpolation with align_corners=False, no antialiasing.

  src = (dst + 0.5) * in / out - 0.5 (float32), clamped below at 0; lo = floor(src), hi = min(lo + 1, in - 1).
  """
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)  # float32 coordinate arithmetic, as torch's CPU kernel for float inputs
  dst = np.arange(out_size, dtype=f32)
  # one rounding of scale * (dst + 0.5) - 0.5, as the fused multiply-add torch's kernel compiles to
  src = np.maximum((np.float64(scale) * (dst + f32(0.5)).astype(np.float64) - 0.5).astype(f32), f32(0))
  lo = np.minimum(src.astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = np.clip(src - lo.astype(f32), f32(0), f32(1))
  w = np.zeros((out_size, in_size), np.float32)
  np.add.at(w, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(w, (np.arange(out_size), hi), frac)
  return w


def bilinear_resize(image: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
  """torch `F.interpolate(bilinear, align_corners=False)` of a float [H, W, C] image to [size, size, C]."""
  image = np.asarray(image, dtype=np.float32)
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  wh, ww = bilinear_matrix(h, size), bilinear_matrix(w, size)
  return np.einsum("oh,hwc,pw->opc", wh, image, ww, optimize=True).astype(np.float32)


def preprocess(image: np.ndarray, protocol: str = DEFAULT_PROTOCOL) -> np.ndarray:
  """uint8 RGB [H, W, 3] -> float32 [299, 299, 3] in the Inception's input range [-1, 1] under `protocol`."""
  check_protocol(protocol)
  if protocol == "clean":
    return (clean_resize(image) - 128.0) / 128.0
  x = _as_rgb_uint8(image).astype(np.float32) / 255.0
  return bilinear_resize(x) * 2.0 - 1.0
