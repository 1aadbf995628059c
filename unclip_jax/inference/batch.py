"""Deterministic batch sampling: every output row has its own key, so an image never depends on its batch.

Row (p, k) — image k of prompt p — draws all its randomness from

  row_key(seed, p, k) = fold_in(fold_in(key(seed), p), k)          (candidate c of it: fold_in(row_key, c))

split per stage by `StageNoise.from_row_keys` (prior x_T and step noise, decoder x_T and step noise, super-res),
and every stage draws its noise per row (`samplers.step_noise` with per-row keys). So image k of prompt p is a
function of (seed, p, k, model, settings) only: the same for any batch size, device count, host count or resume
point. Batches are padded to a fixed row count (the last, short one repeats its last row), so each stage
compiles once per job.
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


_fold = jax.jit(jax.vmap(jax.random.fold_in))


def row_keys(seed: int, prompt_index: Sequence[int], k: Sequence[int], candidates: int = 1) -> jax.Array:
  """Keys of sampled rows, [R·candidates] (row r's candidate c at r·candidates + c):
  fold_in(fold_in(key(seed), p), k), and with candidates > 1 fold_in(that, c)."""
  keys = _keys(np.uint32(seed), np.asarray(prompt_index, np.int32), np.asarray(k, np.int32))
  if candidates == 1:
    return keys
  keys = jnp.repeat(keys, candidates)
  return _fold(keys, np.tile(np.arange(candidates, dtype=np.int32), len(prompt_index)))


@dataclasses.dataclass
class Rows:
  """One batch's output: images [R, H, W, 3] uint8 and the kept candidate's CLIP score (None without reranking)."""
  images: np.ndarray
  clip_scores: list[float | None]


def sample_rows(pipe: UnCLIP, prompts: Sequence[str], prompt_index: Sequence[int], k: Sequence[int], *, seed: int,
                batch_size: int, candidates: int = 1) -> Rows:
  """Images for rows (prompts[r], image k[r] of prompt prompt_index[r]), r < batch_size, as one padded batch.

  prompts: the caption of each row [R]; prompt_index / k: its row key (see the module docstring). The batch is
  padded to `batch_size` rows (× candidates sampled rows), so every call has the same shapes.
  """
  r = len(prompts)
  if not 0 < r <= batch_size or len(prompt_index) != r or len(k) != r:
    raise ValueError(f"need 1..{batch_size} rows with one prompt index and image index each, got {r}, "
                     f"{len(prompt_index)}, {len(k)}")
  if candidates > 1 and not pipe.has_image_encoder:
    raise ValueError("candidates > 1 reranks with CLIP's image tower, which this bundle's clip component lacks")
  pad = batch_size - r
  prompts = list(prompts) + [prompts[-1]] * pad
  prompt_index = list(prompt_index) + [prompt_index[-1]] * pad
  k = list(k) + [k[-1]] * pad
  text = pipe.encode_text(prompts)                                        # [batch_size] rows
  if candidates > 1:
    text = text.take(np.repeat(np.arange(batch_size), candidates))
  out = pipe.run(text, StageNoise.from_row_keys(row_keys(seed, prompt_index, k, candidates)))
  images = np.asarray(out["images"])
  scores: list[float | None] = [None] * r
  if candidates > 1:
    from unclip_jax.stages import clip as clip_stage

    img_emb = np.asarray(pipe.encode_image(list(to_uint8(images))))
    groups = img_emb.reshape(batch_size, candidates, -1)
    order, best = clip_stage.rerank(jnp.asarray(np.asarray(pipe.encode_text(prompts).emb)), jnp.asarray(groups))
    keep = np.asarray(order)[:, 0]
    images = images.reshape(batch_size, candidates, *images.shape[1:])[np.arange(batch_size), keep]
    scores = [float(s) for s in np.asarray(best)[:r, 0]]
  return Rows(images=to_uint8(images[:r]), clip_scores=scores)
