"""The unCLIP paper's decoder conditioning: GLIDE's text transformer plus the CLIP image embedding.

Ramesh et al. 2022 (arXiv:2204.06125), §2.1: "we modify the architecture described in Nichol et al. (2021) by
projecting and adding CLIP embeddings to the existing timestep embedding, and by projecting CLIP embeddings into
four extra tokens of context that are concatenated to the sequence of outputs from the GLIDE text encoder."

  xf_proj, xf_out = GlideTextEncoder(tokens, mask)                     # [B, Temb], [B, ctx, W]
  img             = where(drop_image, learned_null_image_embedding, image_emb)                      # [B, E]
  class_labels    = xf_proj + clip_time_proj(img)                      # added to the UNet's time embedding
  clip_tokens     = clip_tokens_proj(img).reshape(B, n, W)             # n = clip_extra_context_tokens (4)
  tokens          = [xf_out ; clip_tokens]                             # [B, ctx + n, W], no attention mask

As in GLIDE the UNet gets no text mask (pads carry `padding_embedding`). Classifier-free guidance drops the CLIP
embedding to a learned null embedding (the paper's "or a learned embedding") and the caption to the empty token
sequence (`glide_text.drop_text`). No public weights exist for this decoder; it is trained from scratch.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models import layers
from unclip_jax.models.glide_text import GlideTextEncoder

Dtype = Any


class GlideClipConditioning(nn.Module):
  """GLIDE text transformer + CLIP image-embedding projections -> the UNet's keyword arguments.

  Attributes:
    text_encoder: the GLIDE transformer (its xf_width is the UNet's cross_attention_dim).
    clip_embeddings_dim: CLIP image-embedding width E.
    clip_extra_context_tokens: tokens the image embedding is projected into (4).
    dtype: compute dtype; parameters are float32, outputs float32.
  """
  text_encoder: GlideTextEncoder
  clip_embeddings_dim: int = 1024
  clip_extra_context_tokens: int = 4
  dtype: Dtype = jnp.float32

  def setup(self):
    w, n = self.text_encoder.xf_width, self.clip_extra_context_tokens
    self.learned_null_image_embedding = self.param(
        "learned_null_image_embedding", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
        (self.clip_embeddings_dim,), jnp.float32)
    self.clip_time_proj = layers.dense(self.text_encoder.time_embed_dim, (None, "embed"), self.dtype)
    self.clip_tokens_proj = layers.dense(n * w, (None, "embed"), self.dtype)

  def __call__(self, tokens: jax.Array, mask: jax.Array | None, image_emb: jax.Array,
               drop_image: jax.Array | None = None) -> dict:
    """UNet keyword arguments for B rows.

    Args:
      tokens, mask: [B, text_ctx] int ids and bool (True on real tokens), as `GlideTextEncoder` takes them.
      image_emb: [B, E] CLIP image embeddings.
      drop_image: optional [B] bool: those rows get the learned null image embedding (guidance's uncond rows,
        training's 10 % drop).
    Returns:
      dict(encoder_hidden_states [B, ctx + n, W], class_labels [B, Temb], attention_mask=None), float32.
    """
    b, e = tokens.shape[0], self.clip_embeddings_dim
    if image_emb.shape != (b, e):
      raise ValueError(f"image_emb must be [{b}, {e}] (one CLIP image embedding per token row), got "
                       f"{tuple(image_emb.shape)}")
    img = image_emb.astype(jnp.float32)
    if drop_image is not None:
      if drop_image.shape != (b,):
        raise ValueError(f"drop_image must be [{b}], got {tuple(drop_image.shape)}")
      img = jnp.where(drop_image.astype(bool)[:, None], self.learned_null_image_embedding[None], img)
    xf_proj, xf_out = self.text_encoder(tokens, mask)
    img = img.astype(self.dtype)
    n, w = self.clip_extra_context_tokens, self.text_encoder.xf_width
    clip_tokens = self.clip_tokens_proj(img).reshape(b, n, w).astype(jnp.float32)
    return dict(encoder_hidden_states=jnp.concatenate([xf_out, clip_tokens], axis=1),
                class_labels=xf_proj + self.clip_time_proj(img).astype(jnp.float32), attention_mask=None)
