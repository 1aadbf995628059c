"""Real shapes images for the evaluation prompts, as a folder the eval CLIs read (NNNN.png + NNNN.json "prompt").

  python -m unclip_jax.shapes.folder --out DIR --n N [--size 64] [--seed 0] [--prompts-file prompts.txt]

Image k draws `shapes.evaluate.make_prompts(N)[k]` (its colour, shape, background and caption template) with the
dataset's renderer (`shapes.data.draw`, rng (seed, k)), so it is a real image *for the same prompt* a sample of
`python -m unclip_jax.sample --prompts-file prompts.txt` gets: CLIP score and CLIP-FD of generated vs real compare
like with like. `--prompts-file` also writes the N prompts, one a line.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Sequence

import numpy as np


def write_real_folder(out, n: int, *, size: int = 64, seed: int = 0) -> list[str]:
  """Writes out/NNNN.png (uint8 RGB [size, size, 3]) + out/NNNN.json {"prompt", "colour", "shape", "background"}."""
  from unclip_jax.shapes import data as shapes
  from unclip_jax.shapes.evaluate import make_prompts

  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  prompts = make_prompts(n)
  for k, p in enumerate(prompts):
    image, _ = shapes.draw(p.colour, p.shape, p.background, size, np.random.default_rng([seed, k]))
    image.save(out / f"{k:04d}.png")
    (out / f"{k:04d}.json").write_text(json.dumps({
        "prompt": p.text, "colour": shapes.COLOUR_NAMES[p.colour], "shape": shapes.SHAPES[p.shape],
        "background": shapes.COLOUR_NAMES[p.background]}))
  return [p.text for p in prompts]


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m unclip_jax.shapes.folder", description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--n", type=int, required=True, help="number of prompts / images (<= 168)")
  ap.add_argument("--size", type=int, default=64)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--prompts-file", default=None, help="also write the prompts, one a line")
  args = ap.parse_args(argv)
  prompts = write_real_folder(args.out, args.n, size=args.size, seed=args.seed)
  if args.prompts_file:
    pathlib.Path(args.prompts_file).write_text("\n".join(prompts) + "\n")
  print(json.dumps({"written": len(prompts), "out": args.out, "prompts_file": args.prompts_file}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
