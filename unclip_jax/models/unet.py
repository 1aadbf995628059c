"""The ADM/GLIDE UNet of the unCLIP decoder (64²) and both upsamplers, NHWC.

One module reproduces two diffusers classes (docs/layouts.md):

* `UNet2DConditionModel` with Karlo's blocks (`ResnetDownsampleBlock2D`, `SimpleCrossAttnDownBlock2D`,
  `UNetMidBlock2DSimpleCrossAttn`, `SimpleCrossAttnUpBlock2D`, `ResnetUpsampleBlock2D`, `class_embed_type=
  "identity"`, `"scale_shift"` time conditioning): the Karlo decoder and the GLIDE trunk;
* `UNet2DModel` with resnet-only blocks, a mid block without attention and `"default"` time conditioning: the Karlo
  super-res UNets.

  emb   = time_embedding(sinusoid(t, C0)) (+ class_labels)                                  # [B, 4·C0]
  h     = conv_in(x)                                      skips = [h]                       # [B, H, W, C0]
  down  level b: L × (resnet [→ attention]) [→ resnet(down)]; every output is a skip
  mid   resnet [→ attention] → resnet
  up    level b (deepest first): (L+1) × (resnet(cat[h, skip.pop()]) [→ attention]) [→ resnet(up)]
  out   conv_out(SiLU(conv_norm_out(h)))                                                    # [B, H, W, out]

Attention (`AttnAddedKVProcessor2_0`): keys/values are [add_k_proj(text tokens) ; to_k(GN(x))], encoder tokens
first; the additive text-mask bias is right-padded with zeros over the spatial keys (on the cuDNN path the kept
keys are packed in front and passed as lengths instead; on TPU the Pallas splash kernel takes the mask as a key
mask: `AddedKVAttention`).

Submodules are named after the diffusers keys: `down_blocks.1.attentions.0.add_k_proj` ↔
`down_blocks_1/attentions_0/add_k_proj`, so `convert/unet.py` is a pure function of the key.

Inputs of the conditional variants are built with `stages.common.model_input` (super-res: [x_t, upsampled low-res];
GLIDE inpainting: [x_t, image·mask, mask]; both: [x_t, image·mask, mask, upsampled]).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models import layers

Dtype = Any

TIME_SCALE_SHIFTS = ("scale_shift", "default")
CLASS_EMBED_TYPES = (None, "identity")


def _dense(features: int, axes, dtype: Dtype, name: str) -> nn.Dense:
  """`layers.dense` with the UNet's lecun-normal kernel init."""
  return layers.dense(features, axes, dtype, name, kernel_init=nn.initializers.lecun_normal())


def _constrain(h: jax.Array) -> jax.Array:
  return nn.with_logical_constraint(h, ("batch", "act_h", "act_w", "act_ch"))


def upsample_nearest(x: jax.Array) -> jax.Array:
  """Nearest x2 on H and W (= torch interpolate(nearest, scale 2)).  [B, H, W, C] -> [B, 2H, 2W, C]."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def downsample_avg(x: jax.Array) -> jax.Array:
  """avg_pool 2x2 stride 2 (= torch F.avg_pool2d(2, 2)).  [B, H, W, C] -> [B, H/2, W/2, C]."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


# ---- blocks ---------------------------------------------------------------------------------------------------
class ResnetBlock2D(nn.Module):
  """diffusers `ResnetBlock2D`; `sample="up"/"down"` resamples both branches (nearest x2 / avg-pool 2x2).

  x [B, H, W, Cin], temb [B, Temb] -> [B, H', W', out_channels].
  """
  out_channels: int
  time_scale_shift: str = "scale_shift"
  sample: str | None = None
  groups: int = 32
  dropout: float = 0.0
  deterministic: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    out = self.out_channels
    h = nn.silu(layers.group_norm(self.groups, self.dtype, "norm1")(x))
    if self.sample == "up":
      x, h = upsample_nearest(x), upsample_nearest(h)
    elif self.sample == "down":
      x, h = downsample_avg(x), downsample_avg(h)
    elif self.sample is not None:
      raise ValueError(f"ResnetBlock2D.sample must be None, 'up' or 'down', got {self.sample!r}")
    h = layers.conv(out, 3, self.dtype, "conv1")(h)
    scale_shift = self.time_scale_shift == "scale_shift"
    t = _dense(out * (2 if scale_shift else 1), ("embed", None), self.dtype, "time_emb_proj")(nn.silu(temb))
    t = t[:, None, None, :]                                                            # [B, 1, 1, out(·2)]
    norm2 = layers.group_norm(self.groups, self.dtype, "norm2")
    if scale_shift:
      scale, shift = jnp.split(t, 2, axis=-1)                                          # scale first
      h = norm2(h) * (1 + scale) + shift
    else:
      h = norm2(h + t)
    h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=self.deterministic)
    h = layers.conv(out, 3, self.dtype, "conv2")(h)
    if x.shape[-1] != out:
      x = layers.conv(out, 1, self.dtype, "conv_shortcut")(x)
    return _constrain(x + h)


class AddedKVAttention(nn.Module):
  """diffusers `Attention` with `AttnAddedKVProcessor2_0` (SimpleCrossAttn blocks), residual included.

  x [B, H, W, C], context [B, T, Dc], mask [B, T] bool (True = attend) or None -> [B, H, W, C].

  XLA: keys [context; spatial] with diffusers' additive -10000 bias on the masked context keys (bit for bit).
  cuDNN: keys [spatial; kept context first] and a key length per row instead of a bias (the same attention:
  masked keys are left out either way), so the flash kernel runs without a [B, T+HW] bias tensor.
  splash (TPU): keys [context; spatial] with the text mask as a key mask (`layers.splash_attention`): the Pallas
  kernel never materialises the [B, H, HW, T+HW] scores.
  """
  head_dim: int
  groups: int = 32
  attention: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, mask: jax.Array | None) -> jax.Array:
    b, hh, ww, c = x.shape
    heads, d = c // self.head_dim, self.head_dim
    xn = layers.group_norm(self.groups, self.dtype, "group_norm")(x).reshape(b, hh * ww, c)   # row-major (h, w)
    context = context.astype(self.dtype)
    proj = lambda name, y, ax: _dense(c, ax, self.dtype, name)(y).reshape(y.shape[0], y.shape[1], heads, d)
    q = proj("to_q", xn, ("embed", "heads"))                                            # [B, HW, H, D]
    ck, cv = proj("add_k_proj", context, (None, "heads")), proj("add_v_proj", context, (None, "heads"))
    sk, sv = proj("to_k", xn, ("embed", "heads")), proj("to_v", xn, ("embed", "heads"))
    impl = layers.resolve_attention(self.attention, q.dtype, d, has_bias=False, splash_ok=True)
    if impl == "splash":                                     # masks as key masks; keys in diffusers' order
      k, v = jnp.concatenate([ck, sk], 1), jnp.concatenate([cv, sv], 1)                 # [B, T+HW, H, D]
      keep = None if mask is None else jnp.pad(mask, ((0, 0), (0, hh * ww)), constant_values=True)
      out = layers.splash_attention(q, k, v, keep)
    elif mask is not None and impl == "cudnn":
      ck, cv, kept = layers.pack_kept_keys(ck, cv, mask)
      k, v = jnp.concatenate([sk, ck], 1), jnp.concatenate([sv, cv], 1)                 # [B, HW+T, H, D]
      out = layers.dot_product_attention(q, k, v, key_lengths=hh * ww + kept, implementation=self.attention)
    else:
      bias = None
      if mask is not None:                                   # encoder keys first; spatial keys never masked
        bias = layers.attention_bias_from_mask(mask, masked_value=layers.DIFFUSERS_MASK_VALUE)           # [B, T]
        bias = jnp.pad(bias, ((0, 0), (0, hh * ww)))[:, None, None, :]                 # [B, 1, 1, T+HW]
      k, v = jnp.concatenate([ck, sk], 1), jnp.concatenate([cv, sv], 1)                 # [B, T+HW, H, D]
      out = layers.dot_product_attention(q, k, v, bias, implementation=self.attention)
    out = _dense(c, ("heads", "embed"), self.dtype, "to_out_0")(out.reshape(b, hh * ww, c))
    return _constrain(out.reshape(b, hh, ww, c) + x)


class _BlockSettings(nn.Module):
  """Hyper-parameters shared by the down, mid and up blocks."""
  out_channels: int
  num_layers: int = 1
  add_attention: bool = False
  add_sampler: bool = False
  head_dim: int = 64
  time_scale_shift: str = "scale_shift"
  groups: int = 32
  dropout: float = 0.0
  deterministic: bool = True
  remat: str = "none"
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32

  def resnet(self, name: str, sample: str | None = None) -> ResnetBlock2D:
    cls = layers.maybe_remat(ResnetBlock2D, self.remat)
    return cls(self.out_channels, self.time_scale_shift, sample, self.groups, self.dropout,
               self.deterministic, self.dtype, name=name)

  def attention(self, name: str) -> AddedKVAttention:
    cls = layers.maybe_remat(AddedKVAttention, self.remat)
    return cls(self.head_dim, self.groups, self.attention_impl, self.dtype, name=name)


class DownBlock(_BlockSettings):
  """`ResnetDownsampleBlock2D` (no attention) / `SimpleCrossAttnDownBlock2D`; returns (h, skips)."""

  @nn.compact
  def __call__(self, h, temb, context, mask):
    skips = []
    for j in range(self.num_layers):
      h = self.resnet(f"resnets_{j}")(h, temb)
      if self.add_attention:
        h = self.attention(f"attentions_{j}")(h, context, mask)
      skips.append(h)
    if self.add_sampler:
      h = self.resnet("downsamplers_0", "down")(h, temb)
      skips.append(h)
    return h, skips


class MidBlock(_BlockSettings):
  """`UNetMidBlock2DSimpleCrossAttn` (resnet, attention, resnet) or `UNetMidBlock2D(add_attention=False)`."""

  @nn.compact
  def __call__(self, h, temb, context, mask):
    h = self.resnet("resnets_0")(h, temb)
    if self.add_attention:
      h = self.attention("attentions_0")(h, context, mask)
    return self.resnet("resnets_1")(h, temb)


class UpBlock(_BlockSettings):
  """`SimpleCrossAttnUpBlock2D` / `ResnetUpsampleBlock2D`: num_layers resnets on cat([h, skip]) (h first)."""

  @nn.compact
  def __call__(self, h, skips, temb, context, mask):
    for j in range(self.num_layers):
      h = jnp.concatenate([h, skips[j]], axis=-1)
      h = self.resnet(f"resnets_{j}")(h, temb)
      if self.add_attention:
        h = self.attention(f"attentions_{j}")(h, context, mask)
    if self.add_sampler:
      h = self.resnet("upsamplers_0", "up")(h, temb)
    return h


# ---- the UNet -------------------------------------------------------------------------------------------------
class UNet(nn.Module):
  """Decoder / upsampler UNet (diffusers `UNet2DConditionModel` with Karlo blocks, or `UNet2DModel`).

  Attributes:
    in_channels, out_channels: input channels (incl. conditioning, see `model_input`) and output channels
      (6 = [eps, v] for learned variance, 3 for eps only).
    block_out_channels: channels per level; len = number of levels N.
    layers_per_block: resnets per down level L (up levels have L+1).
    attention_levels: per level, whether its blocks have attention (mirrored on the up path).
    mid_block_attention: attention in the mid block.
    head_dim: per-head width of every attention (heads = channels // head_dim).
    cross_attention_dim: width of `encoder_hidden_states` (required when any attention is on).
    time_scale_shift: "scale_shift" (decoder, GLIDE) or "default" (super-res).
    class_embed_type: "identity" (class_labels [B, Temb] added to the time embedding, required) or None.
    time_embed_dim: width of the time embedding (None: 4·block_out_channels[0]).
    flip_sin_to_cos, freq_shift: sinusoid options (Karlo/GLIDE: True, 0).
    center_input_sample: maps x to 2x-1 first (diffusers option, off for Karlo).
    norm_num_groups, dropout: GroupNorm groups; dropout inside every resnet (needs a 'dropout' rng when
      `deterministic=False`).
    dtype: compute dtype (params stay float32; the output is float32).
    remat: one of `layers.REMAT_POLICIES`, applied to every resnet and attention block.
    attention: "auto" (cuDNN flash attention on CUDA GPUs in bf16/fp16, Pallas splash attention on TPU, else
      XLA), "xla", "cudnn" or "splash" (`layers.resolve_attention`).
  """
  in_channels: int = 3
  out_channels: int = 6
  block_out_channels: Sequence[int] = (320, 640, 960, 1280)
  layers_per_block: int = 3
  attention_levels: Sequence[bool] = (False, True, True, True)
  mid_block_attention: bool = True
  head_dim: int = 64
  cross_attention_dim: int | None = 1536
  time_scale_shift: str = "scale_shift"
  class_embed_type: str | None = "identity"
  time_embed_dim: int | None = None
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  center_input_sample: bool = False
  norm_num_groups: int = 32
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat: str = "none"
  attention: str = "auto"

  @property
  def num_levels(self) -> int:
    return len(self.block_out_channels)

  @property
  def temb_dim(self) -> int:
    return self.time_embed_dim or 4 * self.block_out_channels[0]

  @property
  def has_attention(self) -> bool:
    return any(self.attention_levels) or self.mid_block_attention

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, *, encoder_hidden_states: jax.Array | None = None,
               class_labels: jax.Array | None = None, attention_mask: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    """Predicts eps (and the variance interpolation v when out_channels = 2·image channels).

    Args:
      x: [B, H, W, in_channels] noisy image (+ conditioning channels); H, W divisible by 2^(levels-1).
      t: [B] or scalar timesteps (int or float).
      encoder_hidden_states: [B, T, cross_attention_dim] text/image tokens; required when attention is on.
      class_labels: [B, temb_dim] added to the time embedding; required with class_embed_type="identity".
      attention_mask: [B, T] bool, True = attend; None attends to every token.
      deterministic: False enables dropout (rng collection 'dropout').
    Returns:
      [B, H, W, out_channels] float32.
    """
    self._check(x, t, encoder_hidden_states, class_labels, attention_mask)
    b = x.shape[0]
    chans, n = tuple(self.block_out_channels), self.num_levels
    t = jnp.broadcast_to(jnp.asarray(t), (b,))
    temb = layers.timestep_embedding(t, chans[0], flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift)
    temb = layers.TimestepEmbedding(self.temb_dim, dtype=self.dtype, name="time_embedding")(temb.astype(self.dtype))
    if self.class_embed_type == "identity":
      temb = temb + class_labels.astype(self.dtype)
    context, mask = None, None
    if self.has_attention:
      context = encoder_hidden_states.astype(self.dtype)
      mask = None if attention_mask is None else attention_mask.astype(bool)            # [B, T]

    common = dict(head_dim=self.head_dim, time_scale_shift=self.time_scale_shift, groups=self.norm_num_groups,
                  dropout=self.dropout, deterministic=deterministic, remat=self.remat, attention_impl=self.attention,
                  dtype=self.dtype)
    x = x.astype(self.dtype)
    if self.center_input_sample:
      x = 2 * x - 1.0
    h = _constrain(layers.conv(chans[0], 3, self.dtype, "conv_in")(x))
    skips = [h]
    for i in range(n):
      h, s = DownBlock(chans[i], self.layers_per_block, self.attention_levels[i], i < n - 1,
                       name=f"down_blocks_{i}", **common)(h, temb, context, mask)
      skips += s
    h = MidBlock(chans[-1], 1, self.mid_block_attention, False, name="mid_block", **common)(h, temb, context, mask)
    for i in range(n):
      level = n - 1 - i
      take = self.layers_per_block + 1
      level_skips, skips = skips[-take:][::-1], skips[:-take]
      h = UpBlock(chans[level], take, self.attention_levels[level], i < n - 1,
                  name=f"up_blocks_{i}", **common)(h, level_skips, temb, context, mask)
    h = nn.silu(layers.group_norm(self.norm_num_groups, self.dtype, "conv_norm_out")(h))
    return layers.conv(self.out_channels, 3, self.dtype, "conv_out", zero_init=True)(h).astype(jnp.float32)

  def _check(self, x, t, ehs, class_labels, mask):
    n, chans = self.num_levels, tuple(self.block_out_channels)
    if len(self.attention_levels) != n:
      raise ValueError(f"attention_levels {tuple(self.attention_levels)} must have one entry per level "
                       f"({n} block_out_channels)")
    if self.time_scale_shift not in TIME_SCALE_SHIFTS:
      raise ValueError(f"unknown time_scale_shift {self.time_scale_shift!r}; choose one of {TIME_SCALE_SHIFTS}")
    if self.attention not in layers.ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"unknown attention {self.attention!r}; choose one of {layers.ATTENTION_IMPLEMENTATIONS}")
    if self.class_embed_type not in CLASS_EMBED_TYPES:
      raise ValueError(f"unknown class_embed_type {self.class_embed_type!r}; choose one of {CLASS_EMBED_TYPES}")
    for c in chans:
      if c % self.norm_num_groups:
        raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every channel count, not {c}")
    att_chans = [c for c, a in zip(chans, self.attention_levels) if a] + ([chans[-1]] if self.mid_block_attention
                                                                          else [])
    for c in att_chans:
      if c % self.head_dim:
        raise ValueError(f"head_dim={self.head_dim} must divide the channels of every attention level, not {c}")
    if x.ndim != 4:
      raise ValueError(f"x must be [B, H, W, {self.in_channels}] (NHWC), got shape {x.shape}")
    b, hh, ww, c = x.shape
    if c != self.in_channels:
      raise ValueError(f"x has {c} channels but the UNet expects in_channels={self.in_channels} "
                       f"(NHWC input [B, H, W, C]; conditioning channels included, see model_input)")
    f = 2 ** (n - 1)
    if hh % f or ww % f:
      raise ValueError(f"image size {hh}x{ww} must be divisible by 2^(levels-1) = {f} for {n} levels")
    if jnp.ndim(t) not in (0, 1) or (jnp.ndim(t) == 1 and jnp.shape(t)[0] not in (1, b)):
      raise ValueError(f"t must be a scalar or [{b}], got shape {jnp.shape(t)}")
    if self.class_embed_type == "identity":
      if class_labels is None:
        raise ValueError("class_labels [B, time_embed_dim] is required with class_embed_type='identity' "
                         "(unCLIP: the text_proj additive embedding; GLIDE: xf_proj)")
      if class_labels.shape != (b, self.temb_dim):
        raise ValueError(f"class_labels must be [{b}, {self.temb_dim}], got shape {class_labels.shape}")
    elif class_labels is not None:
      raise ValueError("class_labels given but class_embed_type is None")
    if self.has_attention:
      if ehs is None:
        raise ValueError(f"encoder_hidden_states [B, T, {self.cross_attention_dim}] is required: this UNet has "
                         "attention")
      if ehs.ndim != 3 or ehs.shape[0] != b or ehs.shape[-1] != self.cross_attention_dim:
        raise ValueError(f"encoder_hidden_states must be [{b}, T, {self.cross_attention_dim}], got {ehs.shape}")
      if mask is not None and mask.shape != ehs.shape[:2]:
        raise ValueError(f"attention_mask must be [{b}, {ehs.shape[1]}] (one entry per encoder token), "
                         f"got shape {mask.shape}")
    elif mask is not None:
      raise ValueError("attention_mask given but this UNet has no attention")
