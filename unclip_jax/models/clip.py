"""CLIP: causal text transformer + ViT image encoder with linear projections (Radford et al. 2021).

Reproduces transformers `CLIPModel`, `CLIPTextModelWithProjection`, `CLIPVisionModelWithProjection` and the bare
`CLIPTextModel` / `CLIPVisionModel`:

  text    h = token_embedding(ids) + position_embedding(arange(T))                       # [B, T, D]
          pre-LN layers: h += out_proj(attn(layer_norm1(h), causal [+ padding])); h += fc2(act(fc1(layer_norm2(h))))
          last_hidden_state = final_layer_norm(h)                                        # [B, T, D]
          pooled = lhs[argmax(ids)] if eos_token_id == 2 (legacy) else lhs[first ids == eos_token_id]
          text_embeds = text_projection(pooled)                                          # [B, E], unnormalized
  vision  [class_embedding ; patch_embedding(pixels)] + position_embedding -> pre_layrnorm -> layers (no mask)
          last_hidden_state = encoder output (NOT post-LN'd)                             # [B, 1+N, Dv]
          image_embeds = visual_projection(post_layernorm(lhs[:, 0]))                    # [B, E], unnormalized
  logit_scale: scalar parameter, logits = exp(logit_scale)·norm(text)·norm(image)ᵀ

Submodules are named after the HF keys (docs/layouts.md): `text_model.encoder.layers.3.self_attn.q_proj.weight` ↔
`text_model/encoder/layers_3/self_attn/q_proj/kernel`, so `convert/clip.py` is a pure function of the key.
Bare towers (no projection) are the same module with `projection_dim=None`: `encode_*` then return the pooled
output in place of the projected embedding.

Attention (`CLIPConfig.attention`, `layers.self_attention`): the text tower's masks (causal, plus the optional
padding mask on the keys) and the vision tower's (none) are key masks, so "auto" runs the Pallas splash kernel on
TPU and XLA (cuDNN for the unmasked vision tower in bf16/fp16 on CUDA) elsewhere, with the additive
CLIP_MASK_VALUE bias as before. Splash and the bias agree on every query row with a kept key; with causal masking
a row has none only when the padding mask drops every key up to it, which never happens with this tokenizer's
masks (True on BOS..EOS, BOS at position 0). A mask that drops position 0 would change only the
last_hidden_state rows before the first kept token: those positions are masked keys of every other row.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models import layers

Dtype = Any

LEGACY_EOS_TOKEN_ID = 2    # HF keeps argmax(ids) pooling for configs saved with this (wrong) eos id


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Text tower hyper-parameters (HF `CLIPTextConfig` names in comments). Defaults: OpenAI ViT-B/32 text tower."""
  vocab_size: int = 49408        # vocab_size
  width: int = 512               # hidden_size
  layers: int = 12               # num_hidden_layers
  heads: int = 8                 # num_attention_heads
  mlp_dim: int = 2048            # intermediate_size
  context_length: int = 77       # max_position_embeddings
  act: str = "quick_gelu"        # hidden_act
  eos_token_id: int = 2          # 2 -> legacy argmax pooling
  layer_norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Vision tower hyper-parameters (HF `CLIPVisionConfig`). Defaults: OpenAI ViT-B/32 image tower."""
  image_size: int = 224
  patch_size: int = 32
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  act: str = "quick_gelu"
  num_channels: int = 3
  layer_norm_eps: float = 1e-5

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Which parts exist and their sizes.

  `text`/`vision` None drop the tower; `projection_dim` None drops both projections (bare towers); `logit_scale`
  adds the learnable temperature (CLIPModel only).
  """
  text: TextConfig | None = TextConfig()
  vision: VisionConfig | None = VisionConfig()
  projection_dim: int | None = 512
  logit_scale: bool = True
  logit_scale_init: float = 2.6592
  attention: str = "auto"        # both towers: "auto" | "xla" | "cudnn" | "splash" (layers.resolve_attention)


def pool_eos(last_hidden_state: jax.Array, input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """Hidden state at the end-of-text token, with HF's two rules.

  Args:
    last_hidden_state: [B, T, D].
    input_ids: [B, T] int.
    eos_token_id: 2 -> legacy rule `argmax(ids)` (EOT is the largest id); else the first position == eos_token_id
      (position 0 when a row has none, as torch's argmax of an all-zero row).
  Returns:
    [B, D].
  """
  ids = input_ids.astype(jnp.int32)
  if eos_token_id == LEGACY_EOS_TOKEN_ID:
    idx = jnp.argmax(ids, axis=-1)
  else:
    idx = jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1)
  return jnp.take_along_axis(last_hidden_state, idx[:, None, None], axis=1)[:, 0]


class CLIPAttention(nn.Module):
  """Multi-head self-attention with separate biased q/k/v/out projections, scale d^-0.5.

  x [B, T, D], key_mask [B, T] bool (True = attend) or None -> [B, T, D]; `causal` adds the causal mask.
  """
  heads: int
  dtype: Dtype = jnp.float32
  causal: bool = False
  attention: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
    b, t, d = x.shape
    if d % self.heads:
      raise ValueError(f"width {d} is not divisible by heads={self.heads}")
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads)                     # [B, T, H, Dh]
    q = split(layers.dense(d, ("embed", "heads"), self.dtype, "q_proj")(x))
    k = split(layers.dense(d, ("embed", "heads"), self.dtype, "k_proj")(x))
    v = split(layers.dense(d, ("embed", "heads"), self.dtype, "v_proj")(x))
    out = layers.self_attention(q, k, v, key_mask, causal=self.causal, masked_value=layers.CLIP_MASK_VALUE,
                                implementation=self.attention)                         # [B, T, H, Dh]
    return layers.dense(d, ("heads", "embed"), self.dtype, "out_proj")(out.reshape(b, t, d))


class CLIPMLP(nn.Module):
  """fc1 -> activation -> fc2.  [B, T, D] -> [B, T, D]."""
  mlp_dim: int
  act: str = "quick_gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.activation(self.act)(layers.dense(self.mlp_dim, ("embed", "mlp"), self.dtype, "fc1")(x))
    return layers.dense(x.shape[-1], ("mlp", "embed"), self.dtype, "fc2")(h)


class CLIPEncoderLayer(nn.Module):
  """Pre-LN transformer layer.  x [B, T, D], key_mask [B, T] bool or None -> [B, T, D]."""
  heads: int
  mlp_dim: int
  act: str = "quick_gelu"
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  causal: bool = False
  attention: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
    norm = lambda name: layers.layer_norm(self.dtype, name, eps=self.eps)
    attn = CLIPAttention(self.heads, self.dtype, self.causal, self.attention, name="self_attn")
    x = x + attn(norm("layer_norm1")(x), key_mask)
    x = x + CLIPMLP(self.mlp_dim, self.act, self.dtype, name="mlp")(norm("layer_norm2")(x))
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class CLIPEncoder(nn.Module):
  """`num_layers` CLIPEncoderLayers named `layers_{i}` (HF `encoder.layers.{i}`).

  x [B, T, D], key_mask [B, T] bool or None -> [B, T, D].
  """
  num_layers: int
  heads: int
  mlp_dim: int
  act: str = "quick_gelu"
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  remat: str = "none"
  causal: bool = False
  attention: str = "auto"

  def setup(self):
    block = layers.maybe_remat(CLIPEncoderLayer, self.remat)
    self.layers = [block(self.heads, self.mlp_dim, self.act, self.eps, self.dtype, self.causal, self.attention)
                   for _ in range(self.num_layers)]

  def __call__(self, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
    for layer in self.layers:
      x = layer(x, key_mask)
    return x


class CLIPTextEmbeddings(nn.Module):
  """token_embedding(ids) + position_embedding(arange(T)).  [B, T] int -> [B, T, D]."""
  cfg: TextConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    c = self.cfg
    tok = nn.Embed(c.vocab_size, c.width, dtype=self.dtype, param_dtype=jnp.float32, name="token_embedding",
                   embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
    pos = nn.Embed(c.context_length, c.width, dtype=self.dtype, param_dtype=jnp.float32, name="position_embedding",
                   embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.01), ("length", "embed")))
    t = input_ids.shape[-1]
    return tok(input_ids) + pos(jnp.arange(t))[None]


class CLIPTextTransformer(nn.Module):
  """HF `CLIPTextModel` body (`text_model.*`).

  Returns (pooled [B, D], last_hidden_state [B, T, D]).
  """
  cfg: TextConfig
  dtype: Dtype = jnp.float32
  remat: str = "none"
  attention: str = "auto"

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None):
    c = self.cfg
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
    t = input_ids.shape[1]
    if t > c.context_length:
      raise ValueError(f"sequence length {t} exceeds context_length={c.context_length}")
    h = CLIPTextEmbeddings(c, self.dtype, name="embeddings")(input_ids)                  # [B, T, D]
    h = nn.with_logical_constraint(h, ("batch", "length", "embed"))
    if attention_mask is not None and attention_mask.shape != input_ids.shape:          # padding mask on keys
      raise ValueError(f"attention_mask must be {input_ids.shape}, got {attention_mask.shape}")
    h = CLIPEncoder(c.layers, c.heads, c.mlp_dim, c.act, c.layer_norm_eps, self.dtype, self.remat, causal=True,
                    attention=self.attention, name="encoder")(h, attention_mask)
    lhs = layers.layer_norm(self.dtype, "final_layer_norm", eps=c.layer_norm_eps)(h)
    return pool_eos(lhs, input_ids, c.eos_token_id), lhs


class CLIPVisionEmbeddings(nn.Module):
  """[class_embedding ; patch_embedding(pixels)] + position_embedding.  [B, H, W, C] -> [B, 1+N, Dv]."""
  cfg: VisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    c = self.cfg
    p = c.patch_size
    cls = self.param("class_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                     (c.width,), jnp.float32)
    patches = nn.Conv(c.width, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                      param_dtype=jnp.float32, name="patch_embedding",
                      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                               (None, None, "conv_in", "embed")))(pixels)
    b = pixels.shape[0]
    patches = patches.reshape(b, -1, c.width)                                            # [B, N, Dv], row-major
    cls = jnp.broadcast_to(cls.astype(patches.dtype), (b, 1, c.width))
    pos = nn.Embed(c.num_patches + 1, c.width, dtype=self.dtype, param_dtype=jnp.float32, name="position_embedding",
                   embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")))
    return jnp.concatenate([cls, patches], axis=1) + pos(jnp.arange(c.num_patches + 1))[None]


class CLIPVisionTransformer(nn.Module):
  """HF `CLIPVisionModel` body (`vision_model.*`).

  Returns (pooled = post_layernorm(lhs[:, 0]) [B, Dv], last_hidden_state [B, 1+N, Dv] (not post-LN'd)).
  """
  cfg: VisionConfig
  dtype: Dtype = jnp.float32
  remat: str = "none"
  attention: str = "auto"

  @nn.compact
  def __call__(self, pixels: jax.Array):
    c = self.cfg
    want = (c.image_size, c.image_size, c.num_channels)
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
      raise ValueError(f"pixels must be NHWC [B, {want[0]}, {want[1]}, {want[2]}], got shape {pixels.shape}")
    h = CLIPVisionEmbeddings(c, self.dtype, name="embeddings")(pixels.astype(self.dtype))
    h = layers.layer_norm(self.dtype, "pre_layrnorm", eps=c.layer_norm_eps)(h)                     # (sic) HF name
    h = nn.with_logical_constraint(h, ("batch", "length", "embed"))
    lhs = CLIPEncoder(c.layers, c.heads, c.mlp_dim, c.act, c.layer_norm_eps, self.dtype, self.remat,
                      attention=self.attention, name="encoder")(h, None)
    pooled = layers.layer_norm(self.dtype, "post_layernorm", eps=c.layer_norm_eps)(lhs[:, 0])
    return pooled, lhs


class CLIP(nn.Module):
  """Two towers, optional projections and temperature; param tree mirrors the HF prefixed layout.

  Attributes:
    config: CLIPConfig (which towers/projections exist, sizes, the attention implementation).
    dtype: compute dtype; parameters are float32; outputs are float32.
    remat: remat policy of each encoder layer (`layers.REMAT_POLICIES`; "none" off).
  """
  config: CLIPConfig = CLIPConfig()
  dtype: Dtype = jnp.float32
  remat: str = "none"

  def setup(self):
    c = self.config
    if c.text is None and c.vision is None:
      raise ValueError("CLIPConfig needs at least one tower (text or vision)")
    if c.logit_scale and (c.text is None or c.vision is None or c.projection_dim is None):
      raise ValueError("logit_scale needs both towers and projections (CLIPModel)")
    if c.text is not None:
      self.text_model = CLIPTextTransformer(c.text, self.dtype, self.remat, c.attention)
      if c.projection_dim is not None:
        self.text_projection = layers.dense(c.projection_dim, ("embed", None), self.dtype, use_bias=False)
    if c.vision is not None:
      self.vision_model = CLIPVisionTransformer(c.vision, self.dtype, self.remat, c.attention)
      if c.projection_dim is not None:
        self.visual_projection = layers.dense(c.projection_dim, ("embed", None), self.dtype, use_bias=False)
    if c.logit_scale:
      self.logit_scale = self.param("logit_scale", nn.with_logical_partitioning(
          nn.initializers.constant(c.logit_scale_init), ()), (), jnp.float32)

  def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array | None = None):
    """Text tower (+ projection).

    Args:
      input_ids: [B, T] int, T <= context_length.
      attention_mask: optional [B, T] bool padding mask (HF applies it only when passed; unCLIP passes none).
    Returns:
      text_embeds [B, E] float32, unnormalized (the pooled [B, D] when there is no projection);
      last_hidden_state [B, T, D] float32 (after final_layer_norm).
    """
    if self.config.text is None:
      raise ValueError("this CLIP has no text tower")
    pooled, lhs = self.text_model(input_ids, attention_mask)
    emb = self.text_projection(pooled) if self.config.projection_dim is not None else pooled
    return emb.astype(jnp.float32), lhs.astype(jnp.float32)

  def encode_image(self, pixels: jax.Array):
    """Vision tower (+ projection).

    Args:
      pixels: [B, H, W, C] normalized NHWC images (see data/image_processing.py).
    Returns:
      image_embeds [B, E] float32, unnormalized (the pooled [B, Dv] when there is no projection);
      last_hidden_state [B, 1+N, Dv] float32 (before post_layernorm).
    """
    if self.config.vision is None:
      raise ValueError("this CLIP has no vision tower")
    pooled, lhs = self.vision_model(pixels)
    emb = self.visual_projection(pooled) if self.config.projection_dim is not None else pooled
    return emb.astype(jnp.float32), lhs.astype(jnp.float32)

  def __call__(self, input_ids: jax.Array | None = None, pixels: jax.Array | None = None):
    """Runs the towers that are present.

    Returns a dict with `text_embeds` [B, E] / `text_last_hidden_state` [B, T, D] (text tower),
    `image_embeds` [B', E] / `image_last_hidden_state` [B', 1+N, Dv] (vision tower) and `logit_scale` [] (CLIPModel).
    """
    out = {}
    if self.config.text is not None and input_ids is not None:
      out["text_embeds"], out["text_last_hidden_state"] = self.encode_text(input_ids)
    if self.config.vision is not None and pixels is not None:
      out["image_embeds"], out["image_last_hidden_state"] = self.encode_image(pixels)
    if self.config.logit_scale:
      out["logit_scale"] = self.logit_scale
    return out


