"""Config blocks -> Linen modules, their initial and abstract parameters: the one place a config builds a model.

Every stage's `build(cfg)` calls these; so do the bundle loader, the converters and the benchmarks. Each reads
the fields of a `configs/<stage>.py` `model` block strictly (a missing field is a KeyError naming it), plus the
stage's top-level `dtype` / `remat_policy` passed in by the caller.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models import ar_prior as ar_prior_lib, clip as clip_lib, glide_clip as glide_clip_lib
from unclip_jax.models import glide_text as glide_text_lib
from unclip_jax.models import prior as prior_lib, text_proj as text_proj_lib, unet as unet_lib

Block = Mapping[str, Any]
IMAGE_CHANNELS = 3
CONDITIONINGS = ("none", "low_res", "inpaint", "inpaint_low_res")
# decoder `model.text_encoder`: Karlo's CLIP projection, GLIDE's transformer alone, or the unCLIP paper's decoder
# (GLIDE's transformer + the CLIP image embedding, models/glide_clip.py)
TEXT_ENCODERS = ("text_proj", "glide", "glide_clip")


def field(block: Block, key: str, where: str = "model"):
  """block[key], or a KeyError naming the missing config field."""
  if key not in block:
    raise KeyError(f"config field {where}.{key} is missing (every field is declared in configs/<stage>.py)")
  return block[key]


def abstract(init_fn, module) -> Any:
  """Shapes/dtypes of `init_fn(module, rng)` (`jax.eval_shape`: nothing is allocated)."""
  return jax.eval_shape(functools.partial(init_fn, module), jax.random.key(0))


def _dtype(dtype) -> Any:
  return jnp.dtype(dtype or "float32")


# ---- CLIP ---------------------------------------------------------------------------------------------------------
def clip_config(block: Block) -> clip_lib.CLIPConfig:
  """`configs/clip.py` `model` block -> CLIPConfig (a tower block set to None drops that tower)."""
  text, vision = field(block, "text"), field(block, "vision")
  keys_t = ("vocab_size", "width", "layers", "heads", "mlp_dim", "context_length", "act", "eos_token_id",
            "layer_norm_eps")
  keys_v = ("image_size", "patch_size", "width", "layers", "heads", "mlp_dim", "act", "num_channels", "layer_norm_eps")
  text_cfg = None if text is None else clip_lib.TextConfig(**{k: field(text, k, "model.text") for k in keys_t})
  vision_cfg = None if vision is None else clip_lib.VisionConfig(**{k: field(vision, k, "model.vision")
                                                                    for k in keys_v})
  return clip_lib.CLIPConfig(text=text_cfg, vision=vision_cfg, projection_dim=field(block, "projection_dim"),
                             logit_scale=bool(field(block, "logit_scale")),
                             logit_scale_init=float(field(block, "logit_scale_init")),
                             attention=field(block, "attention"))


def clip(block_or_config, *, dtype=None, remat: str = "none") -> clip_lib.CLIP:
  """A CLIP module from a `model` block or a CLIPConfig."""
  cfg = block_or_config if isinstance(block_or_config, clip_lib.CLIPConfig) else clip_config(block_or_config)
  return clip_lib.CLIP(cfg, dtype=_dtype(dtype), remat=remat)


def clip_dummy_inputs(model: clip_lib.CLIP, batch: int = 1):
  """(input_ids [B, T] | None, pixels [B, H, W, C] | None) of the right shapes."""
  c = model.config
  ids = None if c.text is None else jnp.zeros((batch, c.text.context_length), jnp.int32)
  px = None if c.vision is None else jnp.zeros((batch, c.vision.image_size, c.vision.image_size,
                                                 c.vision.num_channels), jnp.float32)
  return ids, px


def init_clip(model: clip_lib.CLIP, rng: jax.Array):
  """Unboxed float32 params (jitted init: op-by-op init of both towers is slow)."""
  return nn.unbox(jax.jit(model.init)(rng, *clip_dummy_inputs(model)))["params"]


# ---- diffusion prior ----------------------------------------------------------------------------------------------
def prior(block: Block, *, dtype=None, remat: str = "none") -> prior_lib.PriorTransformer:
  """A PriorTransformer from a `configs/prior.py` `model` block."""
  if float(field(block, "dropout")) != 0.0:
    raise ValueError(f"model.dropout={block['dropout']} is not implemented in the prior (Karlo and diffusers use 0)")
  return prior_lib.PriorTransformer(
      embedding_dim=field(block, "embedding_dim"), num_embeddings=field(block, "num_embeddings"),
      num_layers=field(block, "num_layers"), num_heads=field(block, "num_heads"), head_dim=field(block, "head_dim"),
      additional_embeddings=field(block, "additional_embeddings"), normalization=field(block, "normalization"),
      dtype=_dtype(dtype), remat=remat, scan_layers=bool(field(block, "scan_layers")),
      attention=field(block, "attention"))


def prior_dummy_inputs(model: prior_lib.PriorTransformer, batch: int = 1):
  """(x_t, timesteps, text_emb, text_enc, text_mask) of the right shapes."""
  e, l = model.embedding_dim, model.num_embeddings
  return (jnp.zeros((batch, e)), jnp.zeros((batch,), jnp.int32), jnp.zeros((batch, e)), jnp.zeros((batch, l, e)),
          jnp.ones((batch, l), bool))


def init_prior(model: prior_lib.PriorTransformer, rng: jax.Array):
  """Unboxed float32 params from dummy inputs of the right shapes."""
  return nn.unbox(model.init(rng, *prior_dummy_inputs(model)))["params"]


# ---- autoregressive prior -----------------------------------------------------------------------------------------
def ar_prior(block: Block, *, dtype=None, remat: str = "none") -> ar_prior_lib.ARPrior:
  """An ARPrior from a `configs/ar_prior.py` `model` block."""
  keys = ("vocab_size", "embedding_dim", "text_len", "num_components", "num_buckets", "num_dot_buckets", "width",
          "num_layers", "num_heads")
  kwargs = {k: field(block, k) for k in keys}
  if kwargs["width"] % kwargs["num_heads"]:
    raise ValueError(f"model.width {kwargs['width']} is not divisible by model.num_heads {kwargs['num_heads']}")
  return ar_prior_lib.ARPrior(**kwargs, dtype=_dtype(dtype), remat=remat)


def init_ar_prior(model: ar_prior_lib.ARPrior, rng: jax.Array):
  """Unboxed float32 params from dummy inputs of the right shapes."""
  k, l = model.num_components, model.text_len
  variables = model.init(rng, jnp.zeros((1, l), jnp.int32), jnp.ones((1, l), bool),
                         jnp.zeros((1, model.embedding_dim)), jnp.zeros((1,), jnp.int32),
                         jnp.zeros((1, k - 1), jnp.int32))
  return nn.unbox(variables)["params"]


# ---- UNet (decoder and upsamplers) --------------------------------------------------------------------------------
def input_channels(image_channels: int, conditioning: str) -> int:
  """UNet in_channels for a conditioning option (image_channels=3: none 3, low_res 6, inpaint 7, both 10)."""
  if conditioning not in CONDITIONINGS:
    raise ValueError(f"unknown conditioning {conditioning!r}; choose one of {CONDITIONINGS}")
  extra = {"none": 0, "low_res": image_channels, "inpaint": image_channels + 1,
           "inpaint_low_res": 2 * image_channels + 1}[conditioning]
  return image_channels + extra


def unet(block: Block, *, dtype=None, remat: str = "none") -> unet_lib.UNet:
  """A UNet from a `configs/decoder.py` / `configs/upsampler.py` `model` block."""
  conditioning = field(block, "conditioning")
  want = input_channels(IMAGE_CHANNELS, conditioning)
  in_ch = field(block, "in_channels") or want
  if in_ch != want:
    raise ValueError(f"model.in_channels={in_ch} does not match model.conditioning={conditioning!r} ({want} channels)")
  return unet_lib.UNet(
      in_channels=in_ch, out_channels=field(block, "out_channels"),
      block_out_channels=tuple(field(block, "block_out_channels")), layers_per_block=field(block, "layers_per_block"),
      attention_levels=tuple(bool(a) for a in field(block, "attention_levels")),
      mid_block_attention=bool(field(block, "mid_block_attention")), head_dim=field(block, "head_dim"),
      cross_attention_dim=field(block, "cross_attention_dim"), time_scale_shift=field(block, "time_scale_shift"),
      class_embed_type=field(block, "class_embed_type"), time_embed_dim=field(block, "time_embed_dim"),
      flip_sin_to_cos=bool(field(block, "flip_sin_to_cos")), freq_shift=float(field(block, "freq_shift")),
      center_input_sample=bool(field(block, "center_input_sample")), norm_num_groups=field(block, "norm_num_groups"),
      dropout=float(field(block, "dropout")), dtype=_dtype(dtype), remat=remat, attention=field(block, "attention"))


def unet_dummy_inputs(model: unet_lib.UNet, batch: int = 1, size: int | None = None, tokens: int = 1):
  """(args, kwargs) of the smallest valid call, for init/eval_shape."""
  size = size or 2 ** (model.num_levels - 1)
  kw = {}
  if model.has_attention:
    kw["encoder_hidden_states"] = jnp.zeros((batch, tokens, model.cross_attention_dim))
  if model.class_embed_type == "identity":
    kw["class_labels"] = jnp.zeros((batch, model.temb_dim))
  return (jnp.zeros((batch, size, size, model.in_channels)), jnp.zeros((batch,), jnp.int32)), kw


def init_unet(model: unet_lib.UNet, rng: jax.Array):
  """Unboxed float32 params from dummy inputs."""
  args, kw = unet_dummy_inputs(model)
  return nn.unbox(model.init(rng, *args, **kw))["params"]


def unet_param_count(model: unet_lib.UNet) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(abstract(init_unet, model)))


# ---- decoder text pathways ----------------------------------------------------------------------------------------
def time_embed_dim(block: Block) -> int:
  """The UNet's time-embedding width: model.time_embed_dim, or 4·block_out_channels[0] when it is None."""
  return field(block, "time_embed_dim") or 4 * tuple(field(block, "block_out_channels"))[0]


def text_proj(block: Block, *, dtype=None) -> text_proj_lib.UnCLIPTextProj:
  """The unCLIP text projection from a `configs/decoder.py` `model` block."""
  return text_proj_lib.UnCLIPTextProj(
      clip_embeddings_dim=field(block, "clip_embedding_dim"), time_embed_dim=time_embed_dim(block),
      cross_attention_dim=field(block, "cross_attention_dim"),
      clip_extra_context_tokens=field(block, "clip_extra_context_tokens"), dtype=_dtype(dtype))


def init_text_proj(model: text_proj_lib.UnCLIPTextProj, rng: jax.Array):
  e = model.clip_embeddings_dim
  return nn.unbox(model.init(rng, image_embeddings=jnp.zeros((1, e)), prompt_embeds=jnp.zeros((1, e)),
                             text_encoder_hidden_states=jnp.zeros((1, 1, e))))["params"]


def glide_text(block: Block, *, dtype=None, remat: str = "none") -> glide_text_lib.GlideTextEncoder:
  """GLIDE's text transformer from a `configs/decoder.py` `model` block (text_encoder "glide").

  Raises a ValueError when cross_attention_dim is not xf_width (the UNet attends to the transformer's output)."""
  for key in ("xf_width", "xf_layers", "xf_heads"):
    value = field(block, key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ValueError(f"model.{key} must be a positive int for the GLIDE text encoder, got {value!r}")
  width, cross = field(block, "xf_width"), field(block, "cross_attention_dim")
  if cross is not None and cross != width:
    raise ValueError(f"model.cross_attention_dim={cross} must equal model.xf_width={width}: the UNet attends to "
                     "the text transformer's output")
  return glide_text_lib.GlideTextEncoder(
      n_vocab=int(field(block, "n_vocab")), text_ctx=int(field(block, "text_ctx")), xf_width=int(width),
      xf_layers=int(field(block, "xf_layers")), xf_heads=int(field(block, "xf_heads")),
      xf_final_ln=bool(field(block, "xf_final_ln")), xf_padding=bool(field(block, "xf_padding")),
      time_embed_dim=int(time_embed_dim(block)), dtype=_dtype(dtype), remat=remat)


def glide_dummy_inputs(model: glide_text_lib.GlideTextEncoder, batch: int = 1):
  """(tokens [B, ctx] int32, mask [B, ctx] bool) of the right shapes."""
  return jnp.zeros((batch, model.text_ctx), jnp.int32), jnp.ones((batch, model.text_ctx), bool)


def init_glide_text(model: glide_text_lib.GlideTextEncoder, rng: jax.Array):
  """Unboxed float32 params (jitted init)."""
  return nn.unbox(jax.jit(model.init)(rng, *glide_dummy_inputs(model)))["params"]


def glide_clip(block: Block, *, dtype=None, remat: str = "none") -> glide_clip_lib.GlideClipConditioning:
  """The unCLIP paper's decoder conditioning (text_encoder "glide_clip"): `glide_text` plus the CLIP image
  embedding (clip_embedding_dim) in the time embedding and clip_extra_context_tokens extra tokens."""
  return glide_clip_lib.GlideClipConditioning(
      text_encoder=glide_text(block, dtype=dtype, remat=remat),
      clip_embeddings_dim=int(field(block, "clip_embedding_dim")),
      clip_extra_context_tokens=int(field(block, "clip_extra_context_tokens")), dtype=_dtype(dtype))


def init_glide_clip(model: glide_clip_lib.GlideClipConditioning, rng: jax.Array):
  """Unboxed float32 params (jitted init)."""
  tokens, mask = glide_dummy_inputs(model.text_encoder)
  image_emb = jnp.zeros((1, model.clip_embeddings_dim))
  return nn.unbox(jax.jit(model.init)(rng, tokens, mask, image_emb))["params"]
