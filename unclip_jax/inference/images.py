"""Image arrays for files and grids: [-1, 1] floats <-> uint8, and sample grids (training and sampling share them)."""
from __future__ import annotations

import numpy as np


def to_uint8(images) -> np.ndarray:
  """[..., 3] floats in [-1, 1] -> uint8 (round half to even, clipped)."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(images) -> np.ndarray:
  """uint8 [..., 3] -> float32 in [-1, 1]."""
  return np.asarray(images, np.float32) / 127.5 - 1.0


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
  """[N, H, W, C] floats in [-1, 1] -> one uint8 [rows·H, cols·W, C] grid (about square; black padding)."""
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f"image_grid needs a non-empty [N, H, W, C] batch, got shape {images.shape}")
  n, h, w, c = images.shape
  cols = columns or int(np.ceil(np.sqrt(n)))
  rows = -(-n // cols)
  u8 = to_uint8(images)
  grid = np.zeros((rows * h, cols * w, c), np.uint8)
  for i in range(n):
    r, k = divmod(i, cols)
    grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = u8[i]
  return grid
