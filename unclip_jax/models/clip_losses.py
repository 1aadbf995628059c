"""CLIP contrastive loss: symmetric InfoNCE with a learnable temperature, single-device and global-batch sharded.

  t, i   = l2norm(text_embeds), l2norm(image_embeds)                      # [B, E]
  scale  = exp(min(logit_scale, log(max_scale)))                           # temperature, clamped so scale <= 100
  logits = scale · t iᵀ                                                    # [B, B], positives on the diagonal
  loss   = ½ (CE(logits, arange B) + CE(logitsᵀ, arange B))                # mean over the global batch

The sharded version runs under `jax.shard_map` over the batch axes ('data', 'fsdp'): every device all-gathers the
(normalized) embeddings of the global batch, computes only its local rows of both logit matrices
([b, B] text->image and [b, B] image->text), and the per-row losses are summed with `psum` and divided by 2B. It
equals the single-device loss on the gathered batch, and so do its gradients (the all-gather transposes to a
reduce-scatter). Memory per device is O(b·B), never O(B²).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

DEFAULT_MAX_SCALE = 100.0
BATCH_AXES = ("data", "fsdp")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """[..., E] -> unit vectors along the last axis (float32)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def temperature(logit_scale: jax.Array, max_scale: float = DEFAULT_MAX_SCALE) -> jax.Array:
  """exp(logit_scale) clamped to <= max_scale (OpenAI CLIP clamps the parameter at log(100)); no gradient past it."""
  return jnp.exp(jnp.minimum(jnp.asarray(logit_scale, jnp.float32), math.log(max_scale)))


def _row_losses(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Cross-entropy per row.  logits [b, B], labels [b] int -> [b]."""
  picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  return jax.nn.logsumexp(logits, axis=-1) - picked


def contrastive_logits(text_embeds: jax.Array, image_embeds: jax.Array, logit_scale: jax.Array,
                       max_scale: float = DEFAULT_MAX_SCALE) -> jax.Array:
  """logits_per_text [Bt, Bi] = temperature · cos(text, image) (HF `CLIPModel.logits_per_text`)."""
  return temperature(logit_scale, max_scale) * l2_normalize(text_embeds) @ l2_normalize(image_embeds).T


def contrastive_loss(text_embeds: jax.Array, image_embeds: jax.Array, logit_scale: jax.Array,
                     max_scale: float = DEFAULT_MAX_SCALE) -> jax.Array:
  """Single-device symmetric InfoNCE.

  Args:
    text_embeds, image_embeds: [B, E] unnormalized; row k of each is a positive pair.
    logit_scale: [] the learnable log temperature (CLIP init log(1/0.07)).
  Returns:
    [] float32 loss.
  """
  logits = contrastive_logits(text_embeds, image_embeds, logit_scale, max_scale)       # [B, B]
  labels = jnp.arange(logits.shape[0])
  return 0.5 * (jnp.mean(_row_losses(logits, labels)) + jnp.mean(_row_losses(logits.T, labels)))


def sharded_contrastive_loss(text_embeds: jax.Array, image_embeds: jax.Array, logit_scale: jax.Array,
                             mesh: jax.sharding.Mesh, *, batch_axes: Sequence[str] = BATCH_AXES,
                             max_scale: float = DEFAULT_MAX_SCALE) -> jax.Array:
  """Global-batch symmetric InfoNCE under `jax.shard_map`; same value and gradients as `contrastive_loss`.

  Args:
    text_embeds, image_embeds: [B, E] global arrays, batch sharded over `batch_axes` (B divisible by their size).
    logit_scale: [] replicated.
    mesh: the training mesh (Auto axes); axes not in `batch_axes` just replicate the computation.
  Returns:
    [] float32 loss, replicated.
  """
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  if not axes:
    raise ValueError(f"none of the batch axes {tuple(batch_axes)} is in the mesh {mesh.axis_names}")
  n_shards = math.prod(mesh.shape[a] for a in axes)
  if text_embeds.shape != image_embeds.shape or text_embeds.ndim != 2:
    raise ValueError(f"text/image embeddings must both be [B, E], got {text_embeds.shape} and {image_embeds.shape}")
  if text_embeds.shape[0] % n_shards:
    raise ValueError(f"global batch {text_embeds.shape[0]} is not divisible by the {n_shards} shards of {axes}")
  global_batch = text_embeds.shape[0]

  def local(t, i, scale):                                                            # t, i: [b, E]
    t, i = l2_normalize(t), l2_normalize(i)
    all_t = jax.lax.all_gather(t, axes, tiled=True)                                  # [B, E]
    all_i = jax.lax.all_gather(i, axes, tiled=True)                                  # [B, E]
    temp = temperature(scale, max_scale)
    b = t.shape[0]
    labels = jax.lax.axis_index(axes) * b + jnp.arange(b)                            # global row ids [b]
    per_text = _row_losses(temp * t @ all_i.T, labels)                               # [b] text -> images
    per_image = _row_losses(temp * i @ all_t.T, labels)                              # [b] image -> texts
    return jax.lax.psum(jnp.sum(per_text) + jnp.sum(per_image), axes) / (2 * global_batch)

  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P()), out_specs=P(), check_vma=True)
  return fn(text_embeds, image_embeds, jnp.asarray(logit_scale, jnp.float32))
