"""Primitives shared by every model: norms with torch defaults, activations, timestep embeddings, attention.

Flax defaults differ from PyTorch (LayerNorm/GroupNorm eps 1e-6, tanh GELU); everything here uses the torch
values so converted weights reproduce the reference outputs (ARCHITECTURE.md §15).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

TORCH_NORM_EPS = 1e-5

LayerNorm = functools.partial(nn.LayerNorm, epsilon=TORCH_NORM_EPS)
GroupNorm = functools.partial(nn.GroupNorm, epsilon=TORCH_NORM_EPS)


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's GELU approximation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: jax.Array) -> jax.Array:
  """The erf GELU of torch.nn.GELU() (Flax's nn.gelu defaults to the tanh approximation)."""
  return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": exact_gelu, "gelu_tanh": nn.gelu, "silu": nn.silu}


def activation(name: str):
  """Looks an activation up by its config name; unknown names raise a ValueError listing the choices."""
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def timestep_embedding(t: jax.Array, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps, as diffusers `Timesteps` and GLIDE/ADM.

  Args:
    t: [B] timesteps.
    dim: embedding width (even).
  Returns:
    [B, dim] float32: [cos, sin] when `flip_sin_to_cos`, else [sin, cos].
  """
  if dim % 2:
    raise ValueError(f"timestep embedding dim must be even, got {dim}")
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


class TimestepEmbedding(nn.Module):
  """diffusers `TimestepEmbedding`: linear_1 -> SiLU -> linear_2.  [B, in] -> [B, features]."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, emb: jax.Array) -> jax.Array:
    emb = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(emb)
    return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(emb))


def attention_bias_from_mask(mask: jax.Array, *, masked_value: float = -10000.0) -> jax.Array:
  """Boolean keep-mask [..., T] -> additive bias [..., T]: 0 where kept, `masked_value` elsewhere.

  -10000 reproduces diffusers bit for bit (ARCHITECTURE.md §15.3); -inf gives the same fp32 softmax for
  rows with at least one kept key.
  """
  return jnp.where(mask.astype(bool), 0.0, masked_value).astype(jnp.float32)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None,
                          *, implementation: str | None = None) -> jax.Array:
  """Scaled dot-product attention through `jax.nn.dot_product_attention` (fused where the backend has it).

  Args:
    q: [B, Tq, H, D]; k, v: [B, Tk, H, D].
    bias: additive bias broadcastable to [B, H, Tq, Tk], or None.
    implementation: None (XLA picks), "xla" or "cudnn".
  Returns:
    [B, Tq, H, D] in q's dtype. The softmax runs in float32 (diffusers' `upcast_softmax`) unless
    a fused kernel is selected.
  """
  if bias is not None:
    bias = jnp.broadcast_to(bias, (q.shape[0], q.shape[2], q.shape[1], k.shape[1])).astype(q.dtype)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=implementation)
