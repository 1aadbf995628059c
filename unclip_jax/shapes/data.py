"""Synthetic captioned shapes: one filled circle/square/triangle of one colour on a plain background of another.

  python -m unclip_jax.shapes.data --out DIR --n N [--size 64] [--seed 0] [--holdout "red circle,blue triangle"]
      [--name shapes] [--overwrite]

Each image: shape size (circle diameter, square side, triangle side) uniform in 30-60 % of the image side,
squares and triangles rotated by up to ±15°, position uniform such that the shape lies fully inside the image.
Drawn at 4× and box-downsampled (antialiased edges; interior and background pixels keep their exact RGB).
Example i depends only on (seed, i). Written through `builders.build_image_text` (PNG) to
DIR/image_text/NAME/1.0.0 with extra features
  colour, shape, background   ClassLabel ids (names in COLOURS / SHAPES)
  geometry                    float32 [4]: centre x, centre y, size (pixels), rotation (degrees)
and metadata {"holdout": [[colour, shape], ...], "colours": {name: rgb}, "shapes": [...], "seed", "size"}.
Held-out colour×shape pairs never appear (zero-shot composition tests).
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from unclip_jax.data import builders

COLOURS = {"red": (230, 25, 25), "green": (30, 170, 50), "blue": (30, 70, 230), "yellow": (245, 215, 30),
           "purple": (140, 50, 190), "orange": (250, 130, 20), "white": (245, 245, 245), "black": (15, 15, 15)}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle")
TEMPLATES = ("{a_c} {s} on {a_b} background", "{a_b} background with {a_c} {s}", "{c} {s}, {b} background")
MIN_FRAC, MAX_FRAC, MAX_ROTATION = 0.3, 0.6, 15.0
SUPERSAMPLE = 4


def parse_holdout(text: str | Sequence[str] | None) -> list[tuple[str, str]]:
  """"red circle, blue triangle" (or a list of such items) -> [("red", "circle"), ("blue", "triangle")]."""
  if not text:
    return []
  items = text.split(",") if isinstance(text, str) else list(text)
  pairs = []
  for item in items:
    words = item.split()
    if len(words) != 2 or words[0] not in COLOURS or words[1] not in SHAPES:
      raise ValueError(f"holdout item {item.strip()!r} is not '<colour> <shape>' with colour in "
                       f"{COLOUR_NAMES} and shape in {SHAPES}")
    pairs.append((words[0], words[1]))
  if len(set(pairs)) == len(COLOURS) * len(SHAPES):
    raise ValueError("holdout excludes every colour×shape pair")
  return sorted(set(pairs))


def with_article(word: str) -> str:
  return ("an " if word[0] in "aeiou" else "a ") + word


def caption(colour: str, shape: str, background: str, template: int = 0) -> str:
  """e.g. "a red circle on a white background", "an orange square on a blue background"."""
  return TEMPLATES[template].format(c=colour, s=shape, b=background, a_c=with_article(colour),
                                    a_b=with_article(background))


def polygon(shape: str, size: float, angle_deg: float) -> np.ndarray:
  """Vertices [V, 2] (x, y) around the origin; size = square side or triangle side. Centred on the centroid."""
  if shape == "square":
    pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * size / 2
  elif shape == "triangle":  # equilateral, apex up
    r = size / math.sqrt(3)   # circumradius
    pts = np.array([[r * math.cos(a), r * math.sin(a)] for a in np.deg2rad([-90, 30, 150])])
  else:
    raise ValueError(shape)
  a = math.radians(angle_deg)
  rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
  return pts @ rot.T


def sample_labels(rng: np.random.Generator, holdout: Sequence[tuple[str, str]]) -> tuple[int, int, int]:
  """(colour id, shape id, background id): pair not held out, background colour != shape colour."""
  while True:
    c, s = int(rng.integers(len(COLOURS))), int(rng.integers(len(SHAPES)))
    if (COLOUR_NAMES[c], SHAPES[s]) not in holdout:
      break
  b = int(rng.integers(len(COLOURS) - 1))
  return c, s, b + (b >= c)


def extent(shape: str, size: float, angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
  """Bounding box (lo [2], hi [2]) of a shape centred on the origin, in pixels (x, y)."""
  if shape == "circle":
    return np.array([-size / 2] * 2), np.array([size / 2] * 2)
  pts = polygon(shape, size, angle_deg)
  return pts.min(0), pts.max(0)


def render(objects: Sequence[tuple[str, str, float, float, float, float]], background: str,
           image_size: int) -> Image.Image:
  """Filled shapes on a plain background -> PIL RGB [size, size]; objects = (shape, colour, cx, cy, size, angle)
  in pixels, drawn in order at SUPERSAMPLE× and box-downsampled (antialiased edges, exact interior RGB)."""
  k = SUPERSAMPLE
  big = Image.new("RGB", (image_size * k, image_size * k), COLOURS[background])
  d = ImageDraw.Draw(big)
  for shape, colour, cx, cy, size, angle in objects:
    fill = COLOURS[colour]
    if shape == "circle":
      d.ellipse([(cx - size / 2) * k, (cy - size / 2) * k, (cx + size / 2) * k - 1, (cy + size / 2) * k - 1],
                fill=fill)
    else:
      d.polygon([((x + cx) * k, (y + cy) * k) for x, y in polygon(shape, size, angle)], fill=fill)
  return big.resize((image_size, image_size), resample=Image.Resampling.BOX)


def random_angle(shape: str, rng: np.random.Generator) -> float:
  """0 for circles, else uniform in ±MAX_ROTATION degrees."""
  return 0.0 if shape == "circle" else float(rng.uniform(-MAX_ROTATION, MAX_ROTATION))


def draw(colour: int, shape: int, background: int, image_size: int, rng: np.random.Generator):
  """-> (PIL RGB image [size, size], geometry float32 [cx, cy, size, angle]) in pixel units."""
  size = rng.uniform(MIN_FRAC, MAX_FRAC) * image_size
  name = SHAPES[shape]
  angle = random_angle(name, rng)
  lo, hi = extent(name, size, angle)
  cx = rng.uniform(-lo[0], image_size - hi[0])
  cy = rng.uniform(-lo[1], image_size - hi[1])
  image = render([(name, COLOUR_NAMES[colour], cx, cy, size, angle)], COLOUR_NAMES[background], image_size)
  return image, np.array([cx, cy, size, angle], np.float32)


def examples(n: int, image_size: int = 64, seed: int = 0,
             holdout: Sequence[tuple[str, str]] = ()) -> Iterator[builders.Record]:
  """n records; record i is a function of (seed, i) only."""
  holdout = [tuple(p) for p in holdout]
  for i in range(n):
    rng = np.random.default_rng([seed, i])
    c, s, b = sample_labels(rng, holdout)
    image, geometry = draw(c, s, b, image_size, rng)
    text = caption(COLOUR_NAMES[c], SHAPES[s], COLOUR_NAMES[b], int(rng.integers(len(TEMPLATES))))
    yield builders.Record(f"{i:08d}", image, text,
                          extra={"colour": c, "shape": s, "background": b, "geometry": geometry})


def features() -> dict:
  return {"colour": tfds.features.ClassLabel(names=COLOUR_NAMES),
          "shape": tfds.features.ClassLabel(names=SHAPES),
          "background": tfds.features.ClassLabel(names=COLOUR_NAMES),
          "geometry": tfds.features.Tensor(shape=(4,), dtype=np.float32)}


def build(out_dir, n: int, *, image_size: int = 64, seed: int = 0, holdout=None, name: str = "shapes",
          overwrite: bool = False):
  """Write the dataset; returns its directory."""
  if n < 1:
    raise ValueError(f"n must be positive, got {n}")
  if image_size < 8:
    raise ValueError(f"image size must be at least 8, got {image_size}")
  pairs = parse_holdout(holdout)
  meta = {"holdout": [list(p) for p in pairs], "colours": {k: list(v) for k, v in COLOURS.items()},
          "shapes": list(SHAPES), "templates": list(TEMPLATES), "seed": seed, "size": image_size, "n": n}
  path, _ = builders.build_image_text(examples(n, image_size, seed, pairs), out_dir, name, encoding_format="png",
                                      extra_features=features(), metadata=meta, overwrite=overwrite)
  return path


def add_dataset_arguments(p: argparse.ArgumentParser) -> None:
  """--out, --n, --size, --seed, --overwrite: what every shapes dataset CLI takes."""
  p.add_argument("--out", required=True, help="tfds data_dir to write into")
  p.add_argument("--n", type=int, required=True, help="number of examples")
  p.add_argument("--size", type=int, default=64, help="image side in pixels")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--overwrite", action="store_true")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m unclip_jax.shapes.data", description=__doc__.split("\n\n")[0])
  add_dataset_arguments(p)
  p.add_argument("--holdout", default="", help='comma-separated colour×shape pairs, e.g. "red circle,blue square"')
  p.add_argument("--name", default="shapes", help="dataset (config) name")
  args = p.parse_args(argv)
  try:
    build(args.out, args.n, image_size=args.size, seed=args.seed, holdout=args.holdout, name=args.name,
          overwrite=args.overwrite)
  except (ValueError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
