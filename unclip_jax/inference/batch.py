"""Deterministic batch sampling: every output row has its own key, so an image never depends on its batch.

Row (p, k) — image k of prompt p — draws all its randomness from

  row_key(seed, p, k) = fold_in(fold_in(key(seed), p), k)
  (reranking with C candidates: candidate c of image k draws row_key(seed, p, k·C + c))

split per stage by `StageNoise.from_row_keys` (prior x_T and step noise, decoder x_T and step noise, super-res),
and every stage draws its noise per row (`samplers.step_noise` with per-row keys). So image k of prompt p is a
function of (seed, p, k, model, settings) only: the same for any batch size, device count, host count or resume
point — bitwise when the pipeline is `batch_invariant` (the CPU default: each network evaluated one row at a time),
else within float rounding across batch shapes. Batches are padded to a fixed row count (the last, short one
repeats its last row), so each stage compiles once per job.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.inference.images import to_uint8
from unclip_jax.inference.pipeline import StageNoise, UnCLIP


@jax.jit
def _keys(seed: jax.Array, prompt: jax.Array, k: jax.Array) -> jax.Array:
  base = jax.random.key(seed)
  return jax.vmap(lambda p, i: jax.random.fold_in(jax.random.fold_in(base, p), i))(prompt, k)


def row_keys(seed: int, prompt_index: Sequence[int], k: Sequence[int]) -> jax.Array:
  """Keys [R] of sampled rows: fold_in(fold_in(key(seed), prompt_index[r]), k[r])."""
  return _keys(np.uint32(seed), np.asarray(prompt_index, np.int32), np.asarray(k, np.int32))


@dataclasses.dataclass
class Rows:
  """Output rows: images [R, H, W, 3] uint8 and the kept candidate's CLIP score (None without reranking)."""
  images: np.ndarray
  clip_scores: list[float | None]


def sample_rows(pipe: UnCLIP, prompts: Sequence[str], prompt_index: Sequence[int], k: Sequence[int], *, seed: int,
                batch_size: int, candidates: int = 1) -> Rows:
  """Images for output rows r: image k[r] of prompt prompt_index[r], whose caption is prompts[r].

  With candidates C > 1, candidate c of image k is drawn as image k·C + c would be without reranking, and the
  one with the highest CLIP score with its prompt is kept. The R·C sampled rows run in batches of `batch_size`
  (the last padded by repeating its last row), so every batch has the same shapes: one compile per stage.
  """
  r = len(prompts)
  if r < 1 or len(prompt_index) != r or len(k) != r:
    raise ValueError(f"need >= 1 rows with one prompt index and image index each, got {r}, {len(prompt_index)}, "
                     f"{len(k)}")
  if batch_size < 1 or candidates < 1:
    raise ValueError(f"batch_size and candidates must be >= 1, got {batch_size}, {candidates}")
  if candidates > 1 and not pipe.has_image_encoder:
    raise ValueError("candidates > 1 reranks with CLIP's image tower, which this bundle's clip component lacks")
  rows = [(i, p, kk * candidates + c) for i, (p, kk) in enumerate(zip(prompt_index, k)) for c in range(candidates)]
  images = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))
    text = pipe.encode_text([prompts[i] for i, _, _ in chunk])
    keys = row_keys(seed, [p for _, p, _ in chunk], [kk for _, _, kk in chunk])
    out = pipe.run(text, StageNoise.from_row_keys(keys))
    images.append(np.asarray(out["images"])[:min(batch_size, len(rows) - start)])
  images = np.concatenate(images)
  scores: list[float | None] = [None] * r
  if candidates > 1:
    from unclip_jax.stages import clip as clip_stage

    pixels = list(to_uint8(images))
    emb = np.concatenate([np.asarray(pipe.encode_image(_padded(pixels[s:s + batch_size], batch_size)))
                          for s in range(0, len(pixels), batch_size)])[:len(pixels)]
    text_emb = np.concatenate([np.asarray(pipe.encode_text(_padded(list(prompts[s:s + batch_size]), batch_size)).emb)
                               for s in range(0, r, batch_size)])[:r]
    order, best = clip_stage.rerank(jnp.asarray(text_emb), jnp.asarray(emb.reshape(r, candidates, -1)))
    keep = np.asarray(order)[:, 0]
    images = images.reshape(r, candidates, *images.shape[1:])[np.arange(r), keep]
    scores = [float(s) for s in np.asarray(best)[:, 0]]
  return Rows(images=to_uint8(images), clip_scores=scores)


def _padded(items: list, n: int) -> list:
  return items + [items[-1]] * (n - len(items))
