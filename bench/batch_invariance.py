"""Batch-size dependence of sampled images, stage by stage, and the cost of batch-invariant (row-by-row) sampling.

With the embedded model (or --bundle), for batched and row-by-row pipelines (`UnCLIP(batch_invariant=...)`):
  * max |difference| between batch B and B single-row calls, per stage, each stage fed identical inputs (CLIP text
    tower, prior, decoder, upsampler) and end to end in uint8; whether the per-row noise draws are identical;
  * images/s of `batch.sample_rows` at --batch (wall and per CPU-second, after a warm-up), alternating the modes.
Prints one JSON object; nothing is asserted (tests/test_batch_sampling.py asserts the bitwise equalities).

  python bench/batch_invariance.py [--bundle B] [--batch 8] [--rows 16] [--repeats 4]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

PROMPTS = pathlib.Path(__file__).resolve().parent.parent / "launch" / "shapes_prompts.txt"


def _mx(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def stage_differences(pipe, prompts: list[str]) -> dict:
  """max |batch - single rows| per stage on identical inputs (the batch's own upstream outputs)."""
  from unclip_jax.diffusion import samplers
  from unclip_jax.inference import batch
  from unclip_jax.inference.pipeline import StageNoise

  b = len(prompts)
  cat = lambda xs: np.concatenate([np.asarray(x) for x in xs])
  one = lambda i: slice(i, i + 1)
  text = pipe.encode_text(prompts)
  keys = batch.row_keys(0, list(range(b)), [0] * b)
  noise, rows = StageNoise.from_row_keys(keys), [StageNoise.from_row_keys(keys[one(i)]) for i in range(b)]
  shape = (b, pipe.decoder_size, pipe.decoder_size, 3)
  out = {"text_emb": _mx(text.emb, cat(pipe.encode_text(prompts[one(i)]).emb for i in range(b))),
         "text_enc": _mx(text.enc, cat(pipe.encode_text(prompts[one(i)]).enc for i in range(b))),
         "step_noise_identical": bool(np.array_equal(
             samplers.step_noise(noise.decoder_rng, 3, shape, np.float32),
             cat(samplers.step_noise(n.decoder_rng, 3, (1,) + shape[1:], np.float32) for n in rows)))}
  emb = pipe.sample_prior(text, noise.prior_rng)
  out["prior"] = _mx(emb, cat(pipe.sample_prior(text.take(one(i)), rows[i].prior_rng) for i in range(b)))
  low = pipe.decode(emb, text, noise.decoder_rng)
  out["decoder"] = _mx(low, cat(pipe.decode(emb[one(i)], text.take(one(i)), rows[i].decoder_rng) for i in range(b)))
  if pipe.sr_cfg is not None:
    out["upsampler"] = _mx(pipe.upsample(low, noise.super_res_rng),
                           cat(pipe.upsample(low[one(i)], rows[i].super_res_rng) for i in range(b)))
  whole = batch.sample_rows(pipe, prompts, list(range(b)), [0] * b, seed=0, batch_size=b).images
  single = batch.sample_rows(pipe, prompts, list(range(b)), [0] * b, seed=0, batch_size=1).images
  out["images_uint8"] = _mx(whole, single)
  out["pixels_differing"] = int((whole != single).sum())
  return out


def main() -> None:
  from unclip_jax import sample
  from unclip_jax.inference import batch
  from unclip_jax.inference.pipeline import UnCLIP

  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--bundle", default=str(sample.DEFAULT_BUNDLE))
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--rows", type=int, default=16, help="images per timed run")
  p.add_argument("--repeats", type=int, default=4)
  args = p.parse_args()
  prompts = [line.strip() for line in PROMPTS.read_text().splitlines() if line.strip()]
  prompts = [prompts[i % len(prompts)] for i in range(max(args.rows, args.batch))]
  pipes = {mode: UnCLIP.from_bundle(args.bundle, batch_invariant=mode == "row_by_row")
           for mode in ("batched", "row_by_row")}
  report = {"batch": args.batch, "differences_batch_vs_single_rows": {
      mode: stage_differences(pipe, prompts[:args.batch]) for mode, pipe in pipes.items()}}
  speed = {mode: [] for mode in pipes}
  run = lambda pipe: batch.sample_rows(pipe, prompts[:args.rows], list(range(args.rows)), [0] * args.rows, seed=0,
                                       batch_size=args.batch)
  for pipe in pipes.values():
    run(pipe)                                                   # warm-up: compile at this batch size
  for _ in range(args.repeats):
    for mode, pipe in pipes.items():
      t, c = time.perf_counter(), time.process_time()
      run(pipe)
      speed[mode].append({"images_per_s": round(args.rows / (time.perf_counter() - t), 3),
                          "images_per_cpu_s": round(args.rows / (time.process_time() - c), 3)})
  report["speed"] = speed
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
