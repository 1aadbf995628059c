"""Diffusion prior: a causal transformer that predicts the (normalised) CLIP image embedding x̂₀.

Reproduces diffusers' `PriorTransformer`, which equals Karlo's prior (docs/layouts.md):

  sequence [text token states (L), pooled text emb, time emb, noised image emb x_t, learned prd query]
           + positional_embedding                                                   # [B, L+4, inner]
  mask     padding mask right-padded by 4 with "keep" + causal mask, additive -10000   # [B, 1, L+4, L+4]
  blocks   pre-LN: x += attn1(norm1(x)); x += ff(norm3(x))   (exact GELU)
  output   proj_to_clip_embeddings(norm_out(x)[:, -1])                                # [B, E]

Unlike diffusers, the causal mask is ALWAYS applied and the padding mask is mandatory (diffusers drops both when
no `attention_mask` is passed; its pipelines always pass one).

Attention (`attention`, `layers.self_attention`): both masks are key masks (the text mask padded with 4 kept
keys, plus causal), so "auto" runs the Pallas splash kernel on TPU and elsewhere XLA with diffusers' additive
-10000 bias (bit for bit). The two agree on every query row with a kept key. Rows without one are the text
positions before the first kept token (every text position under the null conditioning's all-False mask); their
values differ between the two but never reach the output: those positions are masked keys of every other row,
and the output reads only the last (prd) row, which always keeps its 4 additional keys.

Submodules are named after the diffusers keys: `transformer_blocks.3.attn1.to_out.0` ↔
`transformer_blocks_3/attn1/to_out_0`, so `convert/prior.py` is a pure function of the key.

The network works on normalised embeddings. `normalize` / `denormalize` map between CLIP image-embedding space and
the network's space:
  "clip_stats" (Karlo/diffusers): x_n = (x - clip_mean) / clip_std,  x = x_n·clip_std + clip_mean;
  "sqrt_dim" (DALLE2-pytorch):    x_n = l2norm(x)·√E,               x = x_n / √E (unit-norm embeddings).
`clip_mean`/`clip_std` are parameters (1, E) in both modes (they live in the diffusers state dict); they are data
statistics, never trained: the helpers stop their gradient, and optimisers should mask them from weight decay
(see `STATS_PARAMS`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models import layers

Dtype = Any

NORMALIZATIONS = ("clip_stats", "sqrt_dim")
STATS_PARAMS = ("clip_mean", "clip_std")     # top-level params that hold data statistics, not trained weights


def prior_key_mask(text_mask: jax.Array, additional_embeddings: int) -> jax.Array:
  """The prior's key padding mask: the text mask followed by the additional tokens, never masked.

  text_mask [B, L] bool (True = keep) -> [B, L + additional_embeddings] bool. With the causal mask, as a -10000
  additive bias (`layers.self_attention_bias`), this is diffusers' attention mask: (1 - m)·(-10000) over the keys
  plus -10000 above the diagonal, added where both apply.
  """
  return jnp.pad(text_mask.astype(bool), ((0, 0), (0, additional_embeddings)), constant_values=True)


class Attention(nn.Module):
  """diffusers `Attention` as used by `BasicTransformerBlock` (self-attention, biased projections).

  x [B, S, inner], key_mask [B, S] bool (True = attend) or None -> [B, S, inner]; `causal` adds the causal mask
  (the prior's blocks set it).
  """
  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  attention: str = "auto"
  causal: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
    inner = self.num_heads * self.head_dim
    b, s, _ = x.shape
    split = lambda y: y.reshape(b, s, self.num_heads, self.head_dim)                 # [B, S, H, D]
    q = split(layers.dense(inner, ("embed", "heads"), self.dtype, "to_q")(x))
    k = split(layers.dense(inner, ("embed", "heads"), self.dtype, "to_k")(x))
    v = split(layers.dense(inner, ("embed", "heads"), self.dtype, "to_v")(x))
    out = layers.self_attention(q, k, v, key_mask, causal=self.causal, masked_value=layers.DIFFUSERS_MASK_VALUE,
                                implementation=self.attention)                        # [B, S, H, D]
    return layers.dense(inner, ("heads", "embed"), self.dtype, "to_out_0")(out.reshape(b, s, inner))


class _Net0(nn.Module):
  """`ff.net.0` = GELU(proj(x)) with exact (erf) GELU."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.exact_gelu(layers.dense(self.features, ("embed", "mlp"), self.dtype, "proj")(x))


class FeedForward(nn.Module):
  """diffusers `FeedForward(activation_fn="gelu")`: net.0.proj (inner -> 4·inner), exact GELU, net.2."""
  dim: int
  mult: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # `net_0/proj` mirrors the diffusers key `ff.net.0.proj` (the GELU module owns the Linear).
    h = _Net0(self.dim * self.mult, self.dtype, name="net_0")(x)
    return layers.dense(self.dim, ("mlp", "embed"), self.dtype, "net_2")(h)


class TransformerBlock(nn.Module):
  """diffusers `BasicTransformerBlock` without cross-attention: pre-LN self-attention and GELU MLP.

  [B, S, inner] -> [B, S, inner].
  """
  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  scanned: bool = False       # return (x, None), the carry/output pair `nn.scan` expects
  attention: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array):
    inner = self.num_heads * self.head_dim
    x = x + Attention(self.num_heads, self.head_dim, self.dtype, self.attention, causal=True, name="attn1")(
        layers.layer_norm(self.dtype, "norm1")(x), key_mask)
    x = x + FeedForward(inner, dtype=self.dtype, name="ff")(layers.layer_norm(self.dtype, "norm3")(x))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return (x, None) if self.scanned else x


class PriorTransformer(nn.Module):
  """The unCLIP diffusion prior (diffusers `PriorTransformer`, Karlo defaults for its newer options).

  Attributes:
    embedding_dim: CLIP embedding width E (input, pooled text and output width).
    num_embeddings: text tokens L.
    num_layers, num_heads, head_dim: transformer size; inner width = num_heads·head_dim.
    additional_embeddings: tokens after the text; must be 4 ([pooled text, time, x_t, prd]).
    normalization: "clip_stats" or "sqrt_dim" (see the module docstring).
    dtype: compute dtype; parameters are float32. The output is float32.
    remat: remat policy of each block (`layers.REMAT_POLICIES`; "none" off).
    scan_layers: run the blocks with `nn.scan` (one compiled block, params stacked on a leading "layers" axis
      under `transformer_blocks`); otherwise a Python loop over `transformer_blocks_{i}` (the diffusers naming
      the converters use). `stages.prior.stack_blocks` / `unstack_blocks` convert between the two trees.
    attention: "auto" (Pallas splash attention on TPU, else XLA), "xla", "cudnn" or "splash"
      (`layers.resolve_attention`; see the module docstring).
  """
  embedding_dim: int = 768
  num_embeddings: int = 77
  num_layers: int = 20
  num_heads: int = 32
  head_dim: int = 64
  additional_embeddings: int = 4
  normalization: str = "clip_stats"
  dtype: Dtype = jnp.float32
  remat: str = "none"
  scan_layers: bool = False
  attention: str = "auto"

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def seq_len(self) -> int:
    return self.num_embeddings + self.additional_embeddings

  def setup(self):
    if self.additional_embeddings != 4:
      raise ValueError(f"additional_embeddings must be 4 ([pooled text, time, x_t, prd]), "
                       f"got {self.additional_embeddings}")
    if self.normalization not in NORMALIZATIONS:
      raise ValueError(f"unknown normalization {self.normalization!r}; choose one of {NORMALIZATIONS}")
    inner, e = self.inner_dim, self.embedding_dim
    self.time_embedding = layers.TimestepEmbedding(inner, dtype=self.dtype)
    self.proj_in = layers.dense(inner, (None, "embed"), self.dtype)
    self.embedding_proj = layers.dense(inner, (None, "embed"), self.dtype)
    self.encoder_hidden_states_proj = layers.dense(inner, (None, "embed"), self.dtype)
    self.positional_embedding = self.param(
        "positional_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "length", "embed")),
        (1, self.seq_len, inner), jnp.float32)
    self.prd_embedding = self.param(
        "prd_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed")),
        (1, 1, inner), jnp.float32)
    block = layers.maybe_remat(TransformerBlock, self.remat)
    if self.scan_layers:
      self.transformer_blocks = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=(nn.broadcast,),
          length=self.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})(
              self.num_heads, self.head_dim, self.dtype, scanned=True, attention=self.attention)
    else:
      # A list attribute names its members `transformer_blocks_{i}` (= diffusers `transformer_blocks.{i}`).
      self.transformer_blocks = [block(self.num_heads, self.head_dim, self.dtype, attention=self.attention)
                                 for _ in range(self.num_layers)]
    self.norm_out = layers.layer_norm(self.dtype)
    self.proj_to_clip_embeddings = layers.dense(e, ("embed", None), self.dtype)
    self.clip_mean = self.param("clip_mean", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, None)),
                                (1, e), jnp.float32)
    self.clip_std = self.param("clip_std", nn.with_logical_partitioning(nn.initializers.ones_init(), (None, None)),
                               (1, e), jnp.float32)

  def __call__(self, x_t: jax.Array, timesteps: jax.Array, text_emb: jax.Array, text_enc: jax.Array,
               text_mask: jax.Array) -> jax.Array:
    """Predicts the normalised clean image embedding.

    Args:
      x_t: [B, E] noised normalised image embedding.
      timesteps: [B] or scalar training timesteps (int or float).
      text_emb: [B, E] pooled CLIP text embedding (diffusers `proj_embedding`).
      text_enc: [B, L, E] CLIP text token states (diffusers `encoder_hidden_states`).
      text_mask: [B, L] bool, True on real tokens. Required: the causal mask is always applied with it.
    Returns:
      [B, E] float32 x̂₀ in the normalised space.
    """
    self._check_inputs(x_t, timesteps, text_emb, text_enc, text_mask)
    b = x_t.shape[0]
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
    temb = self.time_embedding(layers.timestep_embedding(timesteps, self.inner_dim).astype(self.dtype))   # [B, I]
    p = self.embedding_proj(text_emb.astype(self.dtype))                               # [B, I]
    s = self.encoder_hidden_states_proj(text_enc.astype(self.dtype))                   # [B, L, I]
    x = self.proj_in(x_t.astype(self.dtype))                                           # [B, I]
    prd = jnp.broadcast_to(self.prd_embedding.astype(self.dtype), (b, 1, self.inner_dim))
    h = jnp.concatenate([s, p[:, None], temb[:, None], x[:, None], prd], axis=1)      # [B, S, I]
    h = h + self.positional_embedding.astype(self.dtype)
    h = nn.with_logical_constraint(h, ("batch", "length", "embed"))
    keep = prior_key_mask(text_mask, self.additional_embeddings)                       # [B, S]
    if self.scan_layers:
      h, _ = self.transformer_blocks(h, keep)
    else:
      for block in self.transformer_blocks:
        h = block(h, keep)
    h = self.norm_out(h)
    return self.proj_to_clip_embeddings(h[:, -1]).astype(jnp.float32)                  # [B, E]

  def _check_inputs(self, x_t, timesteps, text_emb, text_enc, text_mask):
    e, l = self.embedding_dim, self.num_embeddings
    if text_mask is None:
      raise ValueError("PriorTransformer needs text_mask [B, L] (True on real tokens); the causal mask is applied "
                       "together with it. Pass jnp.ones((B, L), bool) for unpadded text.")
    if x_t.ndim != 2 or x_t.shape[-1] != e:
      raise ValueError(f"x_t must be [B, {e}] (embedding_dim={e}), got shape {x_t.shape}")
    b = x_t.shape[0]
    if text_emb.shape != (b, e):
      raise ValueError(f"text_emb must be [{b}, {e}] (embedding_dim={e}), got shape {text_emb.shape}")
    if text_enc.shape != (b, l, e):
      raise ValueError(f"text_enc must be [{b}, {l}, {e}] (num_embeddings={l}, embedding_dim={e}), "
                       f"got shape {text_enc.shape}")
    if text_mask.shape != (b, l):
      raise ValueError(f"text_mask must be [{b}, {l}], got shape {text_mask.shape}")
    if jnp.ndim(timesteps) not in (0, 1) or (jnp.ndim(timesteps) == 1 and jnp.shape(timesteps)[0] not in (1, b)):
      raise ValueError(f"timesteps must be a scalar or [{b}], got shape {jnp.shape(timesteps)}")

  # ---- normalisation of CLIP image embeddings ---------------------------------------------------------------
  def normalize(self, image_emb: jax.Array) -> jax.Array:
    """CLIP image embedding [B, E] -> the network's normalised space [B, E] (float32)."""
    x = image_emb.astype(jnp.float32)
    if self.normalization == "sqrt_dim":
      return x / jnp.linalg.norm(x, axis=-1, keepdims=True) * jnp.sqrt(float(self.embedding_dim))
    mean, std = jax.lax.stop_gradient(self.clip_mean), jax.lax.stop_gradient(self.clip_std)
    return (x - mean) / std

  def denormalize(self, x: jax.Array) -> jax.Array:
    """Normalised [B, E] -> CLIP image-embedding space: x·clip_std + clip_mean (diffusers `post_process_latents`)."""
    x = x.astype(jnp.float32)
    if self.normalization == "sqrt_dim":
      return x / jnp.sqrt(float(self.embedding_dim))
    return x * jax.lax.stop_gradient(self.clip_std) + jax.lax.stop_gradient(self.clip_mean)

