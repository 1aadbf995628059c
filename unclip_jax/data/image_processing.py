"""CLIP image preprocessing, identical to transformers `CLIPImageProcessor` (PIL backend), NHWC float32 out.

  resize   shortest side -> `size` with PIL bicubic; the long side becomes int(size * long / short) (truncated)
  crop     center crop `crop_size` (top = (H - c) // 2, left = (W - c) // 2; zero-padded if the image is smaller)
  rescale  uint8 -> float64 * (1/255) -> float32
  normalize (x - mean) / std per channel, OpenAI CLIP statistics

Runs on the host (numpy + Pillow): it is input-pipeline code, not part of a jitted step.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_shortest_side(image: np.ndarray, size: int) -> np.ndarray:
  """[H, W, 3] uint8 -> [h, w, 3] uint8 with min(h, w) == size, PIL bicubic (HF `get_resize_output_image_size`)."""
  h, w = image.shape[:2]
  short, long = (w, h) if w <= h else (h, w)
  new_long = int(size * long / short)
  new_h, new_w = (new_long, size) if w <= h else (size, new_long)
  out = Image.fromarray(image).resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
  return np.asarray(out)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """[H, W, C] -> [size, size, C]; zero-pads (centred, ceil on the leading side) when the image is smaller."""
  h, w = image.shape[:2]
  if h < size or w < size:
    nh, nw = max(h, size), max(w, size)
    top_pad, left_pad = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    padded = np.zeros((nh, nw) + image.shape[2:], image.dtype)
    padded[top_pad:top_pad + h, left_pad:left_pad + w] = image
    image, h, w = padded, nh, nw
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]


def _as_uint8_rgb(image, index: int) -> np.ndarray:
  if isinstance(image, Image.Image):
    if image.mode not in ("RGB", "L"):
      raise ValueError(f"image {index}: PIL mode {image.mode!r} is not supported (use RGB or L)")
    return np.asarray(image.convert("RGB"))
  arr = np.asarray(image)
  if arr.ndim != 3:
    raise ValueError(f"image {index}: expected an [H, W, 3] array (HWC), got ndim={arr.ndim} shape {arr.shape}")
  if arr.shape[-1] != 3:
    raise ValueError(f"image {index}: expected 3 channels last (HWC RGB), got shape {arr.shape}")
  if arr.dtype != np.uint8:
    raise ValueError(f"image {index}: expected dtype uint8 (0..255), got {arr.dtype}")
  if min(arr.shape[:2]) < 1:
    raise ValueError(f"image {index}: empty image of shape {arr.shape}")
  return arr


def preprocess(images: np.ndarray | Image.Image | Sequence[np.ndarray | Image.Image], *, size: int = 224,
               crop_size: int = 224, mean: Sequence[float] = OPENAI_CLIP_MEAN,
               std: Sequence[float] = OPENAI_CLIP_STD) -> np.ndarray:
  """Images -> CLIP pixel values.

  Args:
    images: one image or a sequence (or an [B, H, W, 3] array) of uint8 RGB HWC arrays / PIL images, any sizes.
    size: target shortest side; crop_size: square crop side; mean/std: per-channel statistics.
  Returns:
    [B, crop_size, crop_size, 3] float32 (NHWC), ready for `CLIP.encode_image`.
  Raises:
    ValueError: naming the offending image and what is wrong (ndim, channels, dtype, PIL mode).
  """
  if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 3):
    images = [images]
  elif isinstance(images, np.ndarray) and images.ndim != 4:
    raise ValueError(f"expected an [H, W, 3] image or an [B, H, W, 3] batch, got shape {images.shape}")
  mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  out = []
  for i, image in enumerate(images):
    arr = center_crop(resize_shortest_side(_as_uint8_rgb(image, i), size), crop_size)
    arr = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    out.append((arr - mean32) / std32)
  if not out:
    return np.zeros((0, crop_size, crop_size, 3), np.float32)
  return np.stack(out).astype(np.float32)
