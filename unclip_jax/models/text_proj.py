"""unCLIP text projection: CLIP image/text embeddings -> the decoder's tokens and additive time embedding.

Reproduces diffusers' `UnCLIPTextProjModel`, which equals the conditioning layers of
Karlo's `PLMImUNet` (`clip_emb`, `text_feat_proj`, `clip_tok_proj`, `text_seq_proj`, `cf_param`):

  img          = [cf_emb; image_emb] with classifier-free guidance (uncond FIRST), else image_emb     # [B', E]
  class_labels = clip_image_embeddings_project_to_time_embeddings(img) + embedding_proj(text_emb)    # [B', Temb]
  clip_tokens  = clip_extra_context_tokens_proj(img).reshape(B', Dc, 4).transpose(0, 2, 1)            # CHANNEL-major
  text         = text_encoder_hidden_states_norm(encoder_hidden_states_proj(text_enc))              # [B', L, Dc]
  tokens       = [clip_tokens ; text]                                                               # [B', 4+L, Dc]
  mask         = pad(text_mask, (4, 0), True)                                                       # [B', 4+L]

Parameter names are the diffusers keys (docs/layouts.md); `convert/unet.py` converts them.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models import layers

Dtype = Any


class UnCLIPTextProj(nn.Module):
  """diffusers `UnCLIPTextProjModel`.

  Attributes:
    clip_embeddings_dim: CLIP embedding width E (image and pooled text embeddings, text token states).
    time_embed_dim: decoder time-embedding width (4·block_out_channels[0]).
    cross_attention_dim: decoder token width Dc.
    clip_extra_context_tokens: image tokens prepended to the text (4).
    dtype: compute dtype; parameters are float32, outputs float32.
  """
  clip_embeddings_dim: int = 768
  time_embed_dim: int = 1280
  cross_attention_dim: int = 1536
  clip_extra_context_tokens: int = 4
  dtype: Dtype = jnp.float32

  def setup(self):
    e, dc, n = self.clip_embeddings_dim, self.cross_attention_dim, self.clip_extra_context_tokens
    self.learned_classifier_free_guidance_embeddings = self.param(
        "learned_classifier_free_guidance_embeddings",
        nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)), (e,), jnp.float32)
    self.embedding_proj = layers.dense(self.time_embed_dim, (None, "embed"), self.dtype)
    self.clip_image_embeddings_project_to_time_embeddings = layers.dense(self.time_embed_dim, (None, "embed"), self.dtype)
    self.clip_extra_context_tokens_proj = layers.dense(n * dc, (None, "embed"), self.dtype)
    self.encoder_hidden_states_proj = layers.dense(dc, (None, "embed"), self.dtype)
    self.text_encoder_hidden_states_norm = layers.LayerNorm(
        dtype=self.dtype, param_dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))

  def __call__(self, *, image_embeddings: jax.Array, prompt_embeds: jax.Array,
               text_encoder_hidden_states: jax.Array, do_classifier_free_guidance: bool = False,
               drop_image: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """diffusers `UnCLIPTextProjModel.forward`.

    Args:
      image_embeddings: [B, E] CLIP image embeddings.
      prompt_embeds: [B', E] pooled CLIP text embeddings (B' = 2B as [uncond; cond] with CFG, else B).
      text_encoder_hidden_states: [B', L, E] CLIP text token states.
      do_classifier_free_guidance: prepend the learned CFG image embedding (uncond first).
      drop_image: optional [B] bool (training): replace those image embeddings by the learned CFG embedding.
    Returns:
      (encoder_hidden_states [B', n+L, Dc], class_labels [B', time_embed_dim]), float32.
    """
    img = self.image_embeddings_for(image_embeddings, do_classifier_free_guidance, drop_image)
    self._check(img, prompt_embeds, text_encoder_hidden_states)
    b = img.shape[0]
    img_c, txt = img.astype(self.dtype), prompt_embeds.astype(self.dtype)
    class_labels = self.clip_image_embeddings_project_to_time_embeddings(img_c) + self.embedding_proj(txt)
    n, dc = self.clip_extra_context_tokens, self.cross_attention_dim
    clip_tokens = self.clip_extra_context_tokens_proj(img_c).reshape(b, dc, n).transpose(0, 2, 1)   # channel-major
    text = self.text_encoder_hidden_states_norm(
        self.encoder_hidden_states_proj(text_encoder_hidden_states.astype(self.dtype)))
    tokens = jnp.concatenate([clip_tokens, text], axis=1)
    return tokens.astype(jnp.float32), class_labels.astype(jnp.float32)

  def image_embeddings_for(self, image_embeddings: jax.Array, do_classifier_free_guidance: bool = False,
                           drop_image: jax.Array | None = None) -> jax.Array:
    """[B, E] -> [B, E] (dropped rows replaced) or [2B, E] = [cf_emb x B; image_embeddings] with CFG."""
    e = self.clip_embeddings_dim
    if image_embeddings.ndim != 2 or image_embeddings.shape[-1] != e:
      raise ValueError(f"image_embeddings must be [B, {e}], got shape {image_embeddings.shape}")
    img = image_embeddings.astype(jnp.float32)
    cf = self.learned_classifier_free_guidance_embeddings[None, :]
    if drop_image is not None:
      if drop_image.shape != img.shape[:1]:
        raise ValueError(f"drop_image must be [{img.shape[0]}], got shape {drop_image.shape}")
      img = jnp.where(drop_image[:, None], cf, img)
    if do_classifier_free_guidance:
      img = jnp.concatenate([jnp.broadcast_to(cf, img.shape), img], axis=0)
    return img

  def conditioning(self, *, image_embeddings: jax.Array, prompt_embeds: jax.Array,
                   text_encoder_hidden_states: jax.Array, text_mask: jax.Array,
                   do_classifier_free_guidance: bool = True, drop_image: jax.Array | None = None) -> dict:
    """Decoder keyword arguments for a batch, in diffusers order [uncond; cond] when guiding.

    Args:
      image_embeddings: [B, E].
      prompt_embeds, text_encoder_hidden_states, text_mask: [B', E], [B', L, E], [B', L] bool, already
        [uncond; cond] (B' = 2B) when guiding.
    Returns:
      dict(encoder_hidden_states [B', n+L, Dc], class_labels [B', Temb], attention_mask [B', n+L] bool), ready
      for `UNet.__call__(x, t, **cond)` with x = cat([x_t, x_t]) under guidance.
    """
    ehs, class_labels = self(image_embeddings=image_embeddings, prompt_embeds=prompt_embeds,
                             text_encoder_hidden_states=text_encoder_hidden_states,
                             do_classifier_free_guidance=do_classifier_free_guidance, drop_image=drop_image)
    if text_mask.shape != text_encoder_hidden_states.shape[:2]:
      raise ValueError(f"text_mask must be {text_encoder_hidden_states.shape[:2]}, got {text_mask.shape}")
    return dict(encoder_hidden_states=ehs, class_labels=class_labels,
                attention_mask=decoder_attention_mask(text_mask, self.clip_extra_context_tokens))

  def _check(self, img, prompt_embeds, ths):
    b, e = img.shape[0], self.clip_embeddings_dim
    if prompt_embeds.shape != (b, e):
      raise ValueError(f"prompt_embeds must be [{b}, {e}] (2B rows [uncond; cond] under guidance), got shape "
                       f"{prompt_embeds.shape}")
    if ths.ndim != 3 or ths.shape[0] != b or ths.shape[-1] != e:
      raise ValueError(f"text_encoder_hidden_states must be [{b}, L, {e}], got shape {ths.shape}")


def decoder_attention_mask(text_mask: jax.Array, extra_tokens: int = 4) -> jax.Array:
  """Text mask [B, L] -> decoder mask [B, extra+L]: left-padded with True for the image tokens."""
  return jnp.pad(text_mask.astype(bool), ((0, 0), (extra_tokens, 0)), constant_values=True)

