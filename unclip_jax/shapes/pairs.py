"""Two-object captioned shapes: two filled shapes of two colours, side by side or stacked, on a third colour.

  python -m unclip_jax.shapes.pairs --out DIR --n N [--size 64] [--seed 0] [--name pairs]
      [--holdout-fraction 0.1 --holdout-seed 0] [--overwrite]

The attribute-binding data (unCLIP paper §7: the decoder mixes up which colour goes with which object). Same palette,
shapes, rotation and antialiased drawing as `unclip_jax.shapes.data`. Each image holds object A and object B:
  * relation "horizontal": A lies left of B with a gap between their bounding boxes, and their vertical extents
    overlap (|cy_A − cy_B| ≤ half the smaller height), so "above"/"below" never also describes them;
    "vertical": the same with the axes swapped (A above B);
  * sizes (circle diameter, square / triangle side) uniform in 20–40 % of the side; colour A != colour B; the
    background is a third colour; shapes may repeat ("a red circle to the left of a blue circle").
Captions name both objects, their relation and the background, either object first:
  "a red circle to the left of a blue square on a white background", "a blue square right of a red circle, white
  background", "a white background with a red circle above a blue square", ... (RELATIONS × TEMPLATES).

Held out of the prior's and decoders' training (`--holdout-fraction`): a fraction of the unordered object pairs
{(colour, shape), (colour, shape)} (both orders, both relations) chosen with `--holdout-seed`, and the phrasings
HELDOUT_PHRASES. The "full" dataset (fraction 0) has everything and trains CLIP and the judge.

Written through `builders.build_image_text` (PNG) to DIR/image_text/NAME/1.0.0 with extra features
  colour_a, shape_a, colour_b, shape_b, background   ClassLabel ids (A = left / top object)
  relation                                           ClassLabel ("horizontal", "vertical")
  geometry                                           float32 [2, 4]: per object cx, cy, size, rotation (pixels, °)
and metadata {"holdout_pairs": [[[c, s], [c, s]], ...], "heldout_phrases", "holdout_fraction", "holdout_seed",
"seed", "size", "n", ...}. Example i depends only on (seed, i) and the holdout.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import tensorflow_datasets as tfds

from unclip_jax.data import builders
from unclip_jax.shapes import data as shapes

MIN_FRAC, MAX_FRAC = 0.2, 0.4
MIN_GAP_FRAC = 1 / 32            # at least 2 px between the two boxes at 64²
RELATION_NAMES = ("horizontal", "vertical")
# (A first, B first) phrasings per relation; A is the left / top object.
RELATIONS = {"horizontal": (("to the left of", "left of", "on the left of"),
                            ("to the right of", "right of", "on the right of")),
             "vertical": (("above", "over", "on top of"), ("below", "under", "beneath"))}
HELDOUT_PHRASES = ("on the left of", "on the right of", "on top of", "beneath")
TEMPLATES = ("{first} {rel} {second} on {a_b} background", "{first} {rel} {second}, {b} background",
             "{a_b} background with {first} {rel} {second}")

Obj = tuple[int, int]            # (colour id, shape id)
PairKey = tuple[Obj, Obj]        # sorted: an unordered object pair


class Labels(NamedTuple):
  """One example's facts (ids): A = left / top object."""
  colour_a: int
  shape_a: int
  colour_b: int
  shape_b: int
  background: int
  relation: int


def pair_key(a: Obj, b: Obj) -> PairKey:
  return tuple(sorted((tuple(a), tuple(b))))


def all_pairs() -> list[PairKey]:
  """Every unordered pair of objects with different colours (8·3·7·3 / 2 = 252)."""
  objs = [(c, s) for c in range(len(shapes.COLOURS)) for s in range(len(shapes.SHAPES))]
  return sorted({pair_key(a, b) for a, b in itertools.product(objs, objs) if a[0] != b[0]})


def choose_holdout(fraction: float, seed: int = 0) -> list[PairKey]:
  """ceil(fraction · 252) object pairs drawn without replacement with `seed` (sorted)."""
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
  pairs = all_pairs()
  k = math.ceil(fraction * len(pairs))
  idx = np.random.default_rng([seed, 252]).choice(len(pairs), k, replace=False)
  return sorted(pairs[i] for i in idx)


def pair_names(key: PairKey) -> list[list[str]]:
  return [[shapes.COLOUR_NAMES[c], shapes.SHAPES[s]] for c, s in key]


def parse_pair_names(items) -> list[PairKey]:
  """[[["red", "circle"], ["blue", "square"]], ...] (the metadata's form) -> sorted pair keys."""
  out = []
  for item in items:
    try:
      (c1, s1), (c2, s2) = item
      a = (shapes.COLOUR_NAMES.index(c1), shapes.SHAPES.index(s1))
      b = (shapes.COLOUR_NAMES.index(c2), shapes.SHAPES.index(s2))
    except (ValueError, TypeError) as e:
      raise ValueError(f"holdout pair {item!r} is not [[colour, shape], [colour, shape]]") from e
    if a[0] == b[0]:
      raise ValueError(f"holdout pair {item!r} has one colour twice")
    out.append(pair_key(a, b))
  return sorted(set(out))


def object_text(colour: int, shape: int) -> str:
  """e.g. "a red circle", "an orange square"."""
  return shapes.with_article(f"{shapes.COLOUR_NAMES[colour]} {shapes.SHAPES[shape]}")


def caption(labels: Labels, *, a_first: bool = True, phrase: int = 0, template: int = 0) -> str:
  """The caption of `labels`, naming A first (a_first) or B first, with RELATIONS' phrasing `phrase`."""
  rel = RELATIONS[RELATION_NAMES[labels.relation]][0 if a_first else 1][phrase]
  a, b = object_text(labels.colour_a, labels.shape_a), object_text(labels.colour_b, labels.shape_b)
  first, second = (a, b) if a_first else (b, a)
  bg = shapes.COLOUR_NAMES[labels.background]
  return TEMPLATES[template].format(first=first, second=second, rel=rel, b=bg, a_b=shapes.with_article(bg))


def caption_choices(exclude_phrases: Sequence[str] = ()) -> list[tuple[bool, int]]:
  """(a_first, phrase index) choices; a phrase excluded for one order keeps the other order's phrase usable."""
  out = []
  for a_first in (True, False):
    for i in range(3):
      if all(RELATIONS[r][0 if a_first else 1][i] not in exclude_phrases for r in RELATION_NAMES):
        out.append((a_first, i))
  return out


def sample_labels(rng: np.random.Generator, holdout: set[PairKey]) -> Labels:
  """Two objects with different colours whose unordered pair is not held out, a third background colour and a
  relation; A / B order uniform."""
  n_c, n_s = len(shapes.COLOURS), len(shapes.SHAPES)
  while True:
    ca, cb = (int(x) for x in rng.choice(n_c, 2, replace=False))
    sa, sb = int(rng.integers(n_s)), int(rng.integers(n_s))
    if pair_key((ca, sa), (cb, sb)) not in holdout:
      break
  bg = int(rng.choice([c for c in range(n_c) if c not in (ca, cb)]))
  return Labels(ca, sa, cb, sb, bg, int(rng.integers(len(RELATION_NAMES))))


def place(labels: Labels, image_size: int, rng: np.random.Generator) -> np.ndarray:
  """Geometry [2, 4] (cx, cy, size, angle per object) satisfying the relation (see the module docstring)."""
  names = (shapes.SHAPES[labels.shape_a], shapes.SHAPES[labels.shape_b])
  axis = labels.relation                   # 0: A left of B (x), 1: A above B (y)
  other = 1 - axis
  gap = MIN_GAP_FRAC * image_size
  for _ in range(1000):
    sizes = rng.uniform(MIN_FRAC, MAX_FRAC, 2) * image_size
    angles = [shapes.random_angle(n, rng) for n in names]
    boxes = [shapes.extent(n, s, a) for n, s, a in zip(names, sizes, angles)]     # (lo, hi) around the centre
    ext = [hi - lo for lo, hi in boxes]
    free = image_size - ext[0][axis] - ext[1][axis] - gap
    if free < 0:
      continue
    u = np.sort(rng.uniform(0, free, 2))
    start_a = u[0]                                          # A's box starts here, B's after A's box + gap + slack
    start_b = start_a + ext[0][axis] + gap + (u[1] - u[0])
    centre = np.zeros((2, 2))
    centre[0, axis] = start_a - boxes[0][0][axis]
    centre[1, axis] = start_b - boxes[1][0][axis]
    for j in range(2):
      centre[j, other] = rng.uniform(-boxes[j][0][other], image_size - boxes[j][1][other])
    if abs(centre[0, other] - centre[1, other]) <= min(ext[0][other], ext[1][other]) / 2:
      return np.array([[centre[j, 0], centre[j, 1], sizes[j], angles[j]] for j in range(2)], np.float32)
  raise RuntimeError("could not place two objects")      # unreachable for the fixed size fractions


def draw(labels: Labels, image_size: int, rng: np.random.Generator):
  """-> (PIL RGB image [size, size], geometry float32 [2, 4])."""
  geometry = place(labels, image_size, rng)
  objs = [(shapes.SHAPES[s], shapes.COLOUR_NAMES[c], *map(float, g))
          for (c, s), g in zip(((labels.colour_a, labels.shape_a), (labels.colour_b, labels.shape_b)), geometry)]
  return shapes.render(objs, shapes.COLOUR_NAMES[labels.background], image_size), geometry


def examples(n: int, image_size: int = 64, seed: int = 0, holdout: Sequence[PairKey] = (),
             exclude_phrases: Sequence[str] = ()) -> Iterator[builders.Record]:
  """n records; record i is a function of (seed, i, holdout, exclude_phrases) only."""
  held = set(holdout)
  choices = caption_choices(exclude_phrases)
  if not choices:
    raise ValueError("every relation phrasing is excluded")
  for i in range(n):
    rng = np.random.default_rng([seed, i, 2])
    labels = sample_labels(rng, held)
    image, geometry = draw(labels, image_size, rng)
    a_first, phrase = choices[int(rng.integers(len(choices)))]
    text = caption(labels, a_first=a_first, phrase=phrase, template=int(rng.integers(len(TEMPLATES))))
    yield builders.Record(f"{i:08d}", image, text, extra={**labels._asdict(), "geometry": geometry})


def features() -> dict:
  colour = lambda: tfds.features.ClassLabel(names=shapes.COLOUR_NAMES)
  shape = lambda: tfds.features.ClassLabel(names=shapes.SHAPES)
  return {"colour_a": colour(), "shape_a": shape(), "colour_b": colour(), "shape_b": shape(),
          "background": colour(), "relation": tfds.features.ClassLabel(names=RELATION_NAMES),
          "geometry": tfds.features.Tensor(shape=(2, 4), dtype=np.float32)}


def build(out_dir, n: int, *, image_size: int = 64, seed: int = 0, holdout_fraction: float = 0.0,
          holdout_seed: int = 0, name: str = "pairs", overwrite: bool = False):
  """Write the dataset (held-out pairs and phrasings excluded when holdout_fraction > 0); returns its directory."""
  if n < 1:
    raise ValueError(f"n must be positive, got {n}")
  if image_size < 32:
    raise ValueError(f"image size must be at least 32 for two objects, got {image_size}")
  holdout = choose_holdout(holdout_fraction, holdout_seed)
  phrases = HELDOUT_PHRASES if holdout_fraction > 0 else ()
  meta = {"objects": 2, "holdout_pairs": [pair_names(k) for k in holdout], "heldout_phrases": list(phrases),
          "holdout_fraction": holdout_fraction, "holdout_seed": holdout_seed,
          "colours": {k: list(v) for k, v in shapes.COLOURS.items()}, "shapes": list(shapes.SHAPES),
          "relations": {k: [list(v[0]), list(v[1])] for k, v in RELATIONS.items()}, "templates": list(TEMPLATES),
          "seed": seed, "size": image_size, "n": n}
  path, _ = builders.build_image_text(examples(n, image_size, seed, holdout, phrases), out_dir, name,
                                      encoding_format="png", extra_features=features(), metadata=meta,
                                      overwrite=overwrite)
  return path


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m unclip_jax.shapes.pairs", description=__doc__.split("\n\n")[0])
  shapes.add_dataset_arguments(p)
  p.add_argument("--holdout-fraction", type=float, default=0.0,
                 help="fraction of the 252 object pairs (and the phrasings %s) left out" % (HELDOUT_PHRASES,))
  p.add_argument("--holdout-seed", type=int, default=0, help="which object pairs are held out")
  p.add_argument("--name", default="pairs", help="dataset (config) name")
  args = p.parse_args(argv)
  try:
    build(args.out, args.n, image_size=args.size, seed=args.seed, holdout_fraction=args.holdout_fraction,
          holdout_seed=args.holdout_seed, name=args.name, overwrite=args.overwrite)
  except (ValueError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
