"""The 64² decoder stage (unCLIP §2.1): CLIP image embedding + text -> image, and inpainting.

Everything about the stage but the Linen modules (`models/unet.py`, `models/text_proj.py`, `models/glide_text.py`,
`models/glide_clip.py`): building them from the config, the training loss and task, the conditioning and null text
both share, and the sampler.

Text pathways (`model.text_encoder`): "text_proj" (Karlo: CLIP text states and embeddings through the text
projection), "glide" (GLIDE's transformer on caption tokens, no CLIP; import and sampling), "glide_clip" (the unCLIP
paper's decoder: GLIDE's transformer on caption tokens plus the CLIP image embedding, `GlideClipCond` /
`glide_clip_cond`; trains on the caption tokens the embedding datasets store, `loss_fn_glide_clip`). The
text-to-image pipeline drives "text_proj" and "glide_clip".

Training (`loss_fn`): hybrid loss (ε-MSE + λ·VLB with the learned variance), conditioned through the text
projection; the CLIP image embedding is replaced by text_proj's learned CFG embedding with prob `clip_drop_prob`
(10%) and the text by the null text (zeros, every token masked) with prob `text_drop_prob` (50%).

Conditioning (`decoder_cond`): the text projection turns (image_emb, text_emb, text_enc, text_mask) into the
UNet's keyword arguments (encoder_hidden_states [B', 4+L, Dc], class_labels [B', Temb], attention_mask [B', 4+L]).
Under classifier-free guidance B' = 2B, laid out [uncond; cond] as diffusers' `UnCLIPPipeline` does:
  * the uncond image embedding is text_proj's learned CFG embedding;
  * the uncond text is, by default, what training drops the text to (`loss_fn`): zero
    pooled embedding and token states, every text token masked. Pass `null_text` (a `common.TextCond`, e.g. the
    CLIP encoding of the empty prompt "") to use diffusers'/Karlo's choice instead.
A GLIDE text pathway (or any other) can hand `sample` its UNet kwargs directly (a Mapping, already [uncond; cond]).

Sampling (`sample`): DDPM/DDIM over a respaced schedule ("25"), guidance on ε only with the learned variance taken
from the cond half (`samplers.guide`), x̂0 clamped to ±1, and the output clamped to [-1, 1] (the pipeline's clamp).

Inpainting (mask 1 = known pixel), two ways, chosen by `inpaint_method`:
  * "glide" (models with conditioning="inpaint", 7 input channels): every step the UNet sees
    cat([x_t, image·mask, mask]) (`unet.model_input`) and the known pixels are pasted into x̂0,
    x̂0 = x̂0·(1-m) + image·m (GLIDE's inpainting notebook);
  * "repaint" (any model, RePaint, Lugmayr et al. 2022): the known region of x_{t-1} is replaced by
    q_sample(image, t-1) every step, with `resample_jumps` renoise/denoise repetitions per step
    (`samplers.repaint_sample`). A model with the inpaint channels still gets them.
  "auto" picks "glide" when the UNet has the inpaint channels, else "repaint".
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from unclip_jax.diffusion import samplers
from unclip_jax.diffusion.gaussian import GaussianDiffusion
from unclip_jax.models import glide_text as glide_text_lib, unet as unet_lib
from unclip_jax.models.glide_clip import GlideClipConditioning
from unclip_jax.models.glide_text import GlideTextEncoder
from unclip_jax.models.text_proj import UnCLIPTextProj
from unclip_jax.stages import builders, common
from unclip_jax.stages.common import EMBEDDING_KEYS, IMAGE_CHANNELS, Task, TextCond

Params = Any
INPAINT_METHODS = ("auto", "glide", "repaint")
UNET_KWARGS = ("encoder_hidden_states", "class_labels", "attention_mask")
DEFAULT_SETTINGS = samplers.SamplerSettings(guidance_scale=8.0, clip_range=1.0)


GLIDE_CLIP_KEYS = ("image", "image_emb", "tokens", "text_mask")   # the paper decoder's batch: caption tokens + mask


class Models(NamedTuple):
  """The decoder stage's modules: the UNet, its text pathway (text_proj; or in `text_encoder` GLIDE's text encoder
  for "glide", the GLIDE + CLIP conditioning for "glide_clip"; the other is None) and the Gaussian diffusion."""
  unet: unet_lib.UNet
  text_proj: UnCLIPTextProj | None
  text_encoder: GlideTextEncoder | GlideClipConditioning | None
  diffusion: GaussianDiffusion


def build(cfg, *, dtype=None) -> Models:
  """The stage's modules from a `configs/decoder.py` config (dtype: default the config's compute dtype)."""
  dtype = dtype or cfg.dtype
  pathway = cfg.model.text_encoder
  if pathway not in builders.TEXT_ENCODERS:
    raise ValueError(f"unknown model.text_encoder {pathway!r}; choose one of {builders.TEXT_ENCODERS}")
  unet = builders.unet(cfg.model, dtype=dtype, remat=cfg.remat_policy)
  diffusion = GaussianDiffusion.from_config(cfg.diffusion)
  common.check_output_channels(unet, diffusion, "decoder")
  if pathway == "glide":
    return Models(unet, None, builders.glide_text(cfg.model, dtype=dtype, remat=cfg.remat_policy), diffusion)
  if pathway == "glide_clip":
    return Models(unet, None, builders.glide_clip(cfg.model, dtype=dtype, remat=cfg.remat_policy), diffusion)
  return Models(unet, builders.text_proj(cfg.model, dtype=dtype), None, diffusion)


def init_params(models: Models, rng: jax.Array) -> Params:
  """{"unet": ..., "text_proj": ...} (or {"unet", "text_encoder"} with the GLIDE / GLIDE + CLIP pathways)."""
  u_rng, t_rng = jax.random.split(rng)
  params = {"unet": builders.init_unet(models.unet, u_rng)}
  if models.text_proj is not None:
    params["text_proj"] = builders.init_text_proj(models.text_proj, t_rng)
  elif isinstance(models.text_encoder, GlideClipConditioning):
    params["text_encoder"] = builders.init_glide_clip(models.text_encoder, t_rng)
  else:
    params["text_encoder"] = builders.init_glide_text(models.text_encoder, t_rng)
  return params


def abstract_params(cfg) -> Params:
  """Shapes/dtypes of the stage's params (nothing allocated)."""
  return builders.abstract(init_params, build(cfg, dtype="float32"))


class DecoderCond(NamedTuple):
  """Raw decoder conditioning (a pytree), the training batch's embedding fields.

  image_emb: [B, E] CLIP image embeddings (unnormalised, e.g. the prior's output).
  text_emb: [B, E] pooled CLIP text embeddings.
  text_enc: [B, L, E] CLIP text token states.
  text_mask: [B, L] bool, True on real tokens.
  """
  image_emb: jax.Array
  text_emb: jax.Array
  text_enc: jax.Array
  text_mask: jax.Array


class GlideClipCond(NamedTuple):
  """Raw conditioning of the paper decoder (text_encoder "glide_clip"), a pytree of [B] rows.

  image_emb: [B, E] CLIP image embeddings.
  tokens: [B, L] caption token ids (the CLIP tokenizer's ids in the pipeline; cut or padded to text_ctx).
  text_mask: [B, L] bool, True on real tokens.
  """
  image_emb: jax.Array
  tokens: jax.Array
  text_mask: jax.Array


def check_cond(text_proj: UnCLIPTextProj, cond: DecoderCond) -> tuple[int, int]:
  """Shape checks with messages naming the expected sizes. Returns (B, L)."""
  e = text_proj.clip_embeddings_dim
  if cond.text_mask is None:
    raise ValueError("text_mask is required ([B, L] bool, True on real tokens)")
  if cond.image_emb.ndim != 2 or cond.image_emb.shape[1] != e:
    raise ValueError(f"image_emb must be [B, {e}], got {tuple(cond.image_emb.shape)}")
  b = cond.image_emb.shape[0]
  if cond.text_emb.shape != (b, e):
    raise ValueError(f"text_emb must be [{b}, {e}], got {tuple(cond.text_emb.shape)}")
  if cond.text_enc.ndim != 3 or cond.text_enc.shape[0] != b or cond.text_enc.shape[2] != e:
    raise ValueError(f"text_enc must be [{b}, L, {e}], got {tuple(cond.text_enc.shape)}")
  l = cond.text_enc.shape[1]
  if cond.text_mask.shape != (b, l):
    raise ValueError(f"text_mask must be [{b}, {l}], got {tuple(cond.text_mask.shape)}")
  return b, l


def decoder_cond(text_proj: UnCLIPTextProj, params_text_proj: Params, *, image_emb: jax.Array, text_emb: jax.Array,
                 text_enc: jax.Array, text_mask: jax.Array, guidance: bool | int,
                 null_text: TextCond | None = None, image_conditioning: bool = True) -> dict[str, jax.Array]:
  """UNet keyword arguments for the decoder, [uncond; cond] (2B rows) when `guidance`; with guidance=3 (the
  `SamplerSettings.branches` of a text guidance scale), [uncond; image; cond] (3B rows), the image rows holding the
  CLIP image embedding with the null text.

  Args:
    image_emb: [B, E]; text_emb: [B, E]; text_enc: [B, L, E]; text_mask: [B, L] bool (True = real token).
    guidance: build the doubled batch; the uncond image embedding is text_proj's learned CFG embedding.
    null_text: the uncond text (emb [E] or [B, E], enc [L, E] or [B, L, E], mask [L] or [B, L]); None = zeros
      with an all-False mask, the null that decoder training drops text to.
    image_conditioning: False for a text-only decoder (`cfg.image_conditioning`): the cond rows get the learned CFG
      image embedding too, so `image_emb` is ignored.
  Returns:
    dict(encoder_hidden_states [B', 4+L, Dc], class_labels [B', Temb], attention_mask [B', 4+L] bool).
  """
  cond = DecoderCond(image_emb, text_emb, text_enc, text_mask)
  b, l = check_cond(text_proj, cond)
  emb, enc, mask = text_emb, text_enc, text_mask.astype(bool)
  branches = int(guidance) if not isinstance(guidance, bool) else (2 if guidance else 1)
  if branches not in (1, 2, 3):
    raise ValueError(f"guidance must be a bool or 1, 2 or 3 branches, got {guidance!r}")
  if branches > 1:
    e = text_proj.clip_embeddings_dim
    null = common.zeros_null_text(b, l, e) if null_text is None else common.broadcast_null(null_text, b, l, e)
    nulls = branches - 1
    emb = jnp.concatenate([null.emb.astype(emb.dtype)] * nulls + [emb])
    enc = jnp.concatenate([null.enc.astype(enc.dtype)] * nulls + [enc])
    mask = jnp.concatenate([null.mask] * nulls + [mask])
  # Image rows per branch: the uncond rows (and every row of a text-only decoder) get text_proj's learned CFG
  # embedding, which is what text_proj's own [cf; image] CFG layout puts there; one layout for 1, 2 or 3 branches.
  uncond_rows = b if branches > 1 else 0
  image = jnp.concatenate([image_emb] * branches)
  drop = jnp.concatenate([jnp.ones((uncond_rows,), bool),
                          jnp.full((branches * b - uncond_rows,), not image_conditioning)])
  return text_proj.apply({"params": params_text_proj}, image_embeddings=image, prompt_embeds=emb,
                         text_encoder_hidden_states=enc, text_mask=mask, do_classifier_free_guidance=False,
                         drop_image=drop, method=UnCLIPTextProj.conditioning)


# ---- the paper decoder's conditioning (text_encoder "glide_clip") -----------------------------------------------
def fit_tokens(tokens: jax.Array, mask: jax.Array, text_ctx: int, end_token: int) -> tuple[jax.Array, jax.Array]:
  """Caption tokens [B, L] + mask [B, L] -> [B, text_ctx] as GLIDE's `padded_tokens_and_mask` makes them: cut to
  text_ctx, right-padded with `end_token` (mask False)."""
  if tokens.ndim != 2 or mask.shape != tokens.shape:
    raise ValueError(f"tokens and text_mask must both be [B, L], got {tuple(tokens.shape)} and {tuple(mask.shape)}")
  tokens, mask = tokens[:, :text_ctx], mask[:, :text_ctx]
  pad = ((0, 0), (0, text_ctx - tokens.shape[1]))
  return (jnp.pad(tokens.astype(jnp.int32), pad, constant_values=end_token),
          jnp.pad(mask.astype(bool), pad, constant_values=False))


def glide_clip_cond(encoder: GlideClipConditioning, params_encoder: Params, *, image_emb: jax.Array,
                    tokens: jax.Array, text_mask: jax.Array, guidance: bool | int = False,
                    image_conditioning: bool = True) -> dict[str, jax.Array]:
  """UNet keyword arguments of the paper decoder, laid out as `decoder_cond`'s: B rows, [uncond; cond] (2B) when
  `guidance`, [uncond; image; cond] (3B) with guidance=3 (a text guidance scale).

  Args:
    image_emb: [B, E] CLIP image embeddings; tokens, text_mask: [B, L] caption ids and mask (`fit_tokens`).
    guidance: the uncond rows get the learned null image embedding and the empty caption; the image rows (3
      branches) the image embedding with the empty caption.
    image_conditioning: False for a text-only decoder: every row gets the null image embedding.
  Returns:
    dict(encoder_hidden_states [B', ctx + 4, W], class_labels [B', Temb], attention_mask=None).
  """
  text = encoder.text_encoder
  tokens, mask = fit_tokens(tokens, text_mask, text.text_ctx, text.end_token)
  b = tokens.shape[0]
  if image_emb.ndim != 2 or image_emb.shape[0] != b:
    raise ValueError(f"image_emb must be [{b}, E] (one per caption), got {tuple(image_emb.shape)}")
  branches = int(guidance) if not isinstance(guidance, bool) else (2 if guidance else 1)
  if branches not in (1, 2, 3):
    raise ValueError(f"guidance must be a bool or 1, 2 or 3 branches, got {guidance!r}")
  no_text = jnp.arange(branches * b) < (branches - 1) * b          # uncond (and image-only) rows: empty caption
  rows_tokens, rows_mask = glide_text_lib.drop_text(jnp.tile(tokens, (branches, 1)), jnp.tile(mask, (branches, 1)),
                                                    no_text, text.end_token)
  drop_image = jnp.concatenate([jnp.ones((b if branches > 1 else 0,), bool),
                                jnp.full(((branches - (branches > 1)) * b,), not image_conditioning)])
  return encoder.apply({"params": params_encoder}, rows_tokens, rows_mask, jnp.tile(image_emb, (branches, 1)),
                       drop_image)


def unet_kwargs(params: Params, cond: DecoderCond | GlideClipCond, *, text_proj: UnCLIPTextProj | None,
                text_encoder: GlideClipConditioning | None, guidance: bool | int, null_text: TextCond | None = None,
                image_conditioning: bool = True) -> dict[str, jax.Array]:
  """The UNet's keyword arguments for a raw conditioning, through its pathway: `decoder_cond` (text_proj) for a
  `DecoderCond`, `glide_clip_cond` (text_encoder; `null_text` does not apply) for a `GlideClipCond`."""
  if isinstance(cond, DecoderCond):
    if text_proj is None:
      raise ValueError("a DecoderCond needs text_proj; pass prebuilt UNet kwargs for other text pathways")
    return decoder_cond(text_proj, params["text_proj"], image_emb=cond.image_emb, text_emb=cond.text_emb,
                        text_enc=cond.text_enc, text_mask=cond.text_mask, guidance=guidance, null_text=null_text,
                        image_conditioning=image_conditioning)
  if text_encoder is None:
    raise ValueError("a GlideClipCond needs text_encoder (the decoder's GlideClipConditioning)")
  return glide_clip_cond(text_encoder, params["text_encoder"], image_emb=cond.image_emb, tokens=cond.tokens,
                         text_mask=cond.text_mask, guidance=guidance, image_conditioning=image_conditioning)


# ---- inpainting inputs -------------------------------------------------------------------------------------------
def conditioning_of(unet: unet_lib.UNet) -> str:
  """"none" (3 input channels) or "inpaint" (GLIDE, 7: [x_t, image·mask, mask])."""
  return common.conditioning_of(unet, ("none", "inpaint"), "decoder")


def _tile_rows(x: jax.Array | None, rows: int) -> jax.Array | None:
  """[B, ...] -> [rows, ...] by repeating the batch (the [uncond; cond] doubling)."""
  if x is None or x.shape[0] == rows:
    return x
  if rows % x.shape[0]:
    raise ValueError(f"cannot tile a batch of {x.shape[0]} to {rows} rows")
  return jnp.tile(x, (rows // x.shape[0],) + (1,) * (x.ndim - 1))


# ---- sampling ----------------------------------------------------------------------------------------------------
def model_fn_for(unet: unet_lib.UNet, unet_params: Params, cond: Mapping[str, jax.Array], *,
                 inpaint_image: jax.Array | None = None, inpaint_mask: jax.Array | None = None):
  """`model_fn(x [N, H, W, 3], t [N]) -> out [N, H, W, 6]` with the UNet kwargs `cond` (N rows) bound.

  For `samplers.sample` / `samplers.ddim_invert`: with guidance bind the [uncond; cond] kwargs (N = 2B). A UNet with
  the GLIDE inpaint channels gets cat([x, image·mask, mask]) (image [B, H, W, 3], mask [B, H, W, 1], repeated to N
  rows; zeros when not given).
  """
  conditioning = conditioning_of(unet)
  kwargs = {k: v for k, v in cond.items() if v is not None}
  unknown = sorted(set(kwargs) - set(UNET_KWARGS))
  if unknown:
    raise ValueError(f"decoder conditioning has unknown UNet arguments {unknown}; expected {list(UNET_KWARGS)}")

  def fn(x, t):
    if conditioning == "inpaint":
      x = common.model_input(x, conditioning="inpaint", inpaint_image=_tile_rows(inpaint_image, x.shape[0]),
                               inpaint_mask=_tile_rows(inpaint_mask, x.shape[0]))
    return unet.apply({"params": unet_params}, x, t, **kwargs)
  return fn


def _cond_rows(cond: Mapping[str, jax.Array]) -> int:
  return next(v.shape[0] for k, v in cond.items() if v is not None)


def sample(params: Params, cond: DecoderCond | Mapping[str, jax.Array], x_T: jax.Array, rng: jax.Array, *,
           unet: unet_lib.UNet, text_proj: UnCLIPTextProj | None, diffusion: GaussianDiffusion,
           steps: str | int = "25", settings: samplers.SamplerSettings = DEFAULT_SETTINGS,
           null_text: TextCond | None = None, inpaint_image: jax.Array | None = None,
           inpaint_mask: jax.Array | None = None, inpaint_method: str = "auto", resample_jumps: int = 1,
           image_conditioning: bool = True, progress: Callable[[Any], None] | None = None,
           sharding=None, text_encoder: GlideClipConditioning | None = None) -> jax.Array:
  """Samples 64² images (traceable; jit the caller, or use `make_sampler`).

  Args:
    params: the decoder stage's params {"unet": ..., "text_proj" or "text_encoder": ...} (the text pathway's
      unused for prebuilt kwargs).
    cond: `DecoderCond` ([B] rows; built with `decoder_cond`), `GlideClipCond` ([B] rows, the paper decoder; needs
      `text_encoder`, built with `glide_clip_cond`; `null_text` does not apply: its uncond caption is the empty
      one), or prebuilt UNet kwargs (encoder_hidden_states, class_labels, attention_mask) with 2B rows
      [uncond; cond] when guiding, B otherwise.
    x_T: [B, H, W, 3] initial noise.
    rng: per-step noise key: step i draws `samplers.step_noise(rng, i, x_T.shape, ...)` (RePaint:
      `samplers.repaint_keys`).
    settings: guidance_scale != 1 runs the doubled batch, a text_guidance_scale the tripled one (see
      `decoder_cond`); guidance on ε, variance from the cond rows. `settings_for(cfg)` reads both from a config.
    null_text: uncond text for `DecoderCond` (default zeros, see `decoder_cond`).
    inpaint_image: [B, H, W, 3] in [-1, 1]; inpaint_mask: [B, H, W, 1] or [B, H, W], 1 = known pixel.
    inpaint_method: one of INPAINT_METHODS (see the module docstring); resample_jumps: RePaint's r >= 1.
    image_conditioning: False for a text-only decoder (the `DecoderCond`'s image_emb is ignored).
    progress, sharding: as in `samplers.sample`.
  Returns:
    [B, H, W, 3] float32 images in [-1, 1].
  """
  if x_T.ndim != 4 or x_T.shape[-1] != IMAGE_CHANNELS:
    raise ValueError(f"x_T must be [B, H, W, {IMAGE_CHANNELS}] (NHWC), got {tuple(x_T.shape)}")
  common.check_output_channels(unet, diffusion, "decoder")
  if inpaint_method not in INPAINT_METHODS:
    raise ValueError(f"unknown inpaint_method {inpaint_method!r}; choose one of {INPAINT_METHODS}")
  conditioning = conditioning_of(unet)
  image, mask = common.check_inpaint(x_T, inpaint_image, inpaint_mask)
  branches = settings.branches
  b = x_T.shape[0]
  if isinstance(cond, (DecoderCond, GlideClipCond)):
    if cond.image_emb.shape[0] != b:
      raise ValueError(f"conditioning has {cond.image_emb.shape[0]} rows but x_T has batch {b}")
    kwargs = unet_kwargs(params, cond, text_proj=text_proj, text_encoder=text_encoder, guidance=branches,
                         null_text=null_text, image_conditioning=image_conditioning)
  elif isinstance(cond, Mapping):
    kwargs = dict(cond)
    rows = branches * b
    layout = {1: "B", 2: "[uncond; cond]", 3: "[uncond; image; cond]"}[branches]
    if _cond_rows(kwargs) != rows:
      raise ValueError(f"prebuilt UNet kwargs must have {rows} rows ({layout}), got {_cond_rows(kwargs)}")
  else:
    raise ValueError(f"cond must be a DecoderCond, a GlideClipCond or a mapping of UNet kwargs, got "
                     f"{type(cond).__name__}")

  method = inpaint_method
  if method == "auto":
    method = "glide" if conditioning == "inpaint" else "repaint"
  if method == "glide" and conditioning != "inpaint":
    raise ValueError("inpaint_method='glide' needs a UNet with the inpaint channels (conditioning='inpaint', "
                     "7 input channels); use 'repaint' for this model")
  model_fn = model_fn_for(unet, params["unet"], kwargs, inpaint_image=image, inpaint_mask=mask)
  shared = dict(diffusion=diffusion, steps=steps, settings=settings, progress=progress, sharding=sharding)
  if image is None:
    x0 = samplers.sample(model_fn, x_T, rng, **shared)
  elif method == "glide":
    x0 = samplers.sample(model_fn, x_T, rng, denoised_fn=samplers.paste_known(image, mask), **shared)
  else:
    x0 = samplers.repaint_sample(model_fn, x_T, rng, known=image, mask=mask, resample_jumps=resample_jumps,
                                 **shared)
  return jnp.clip(x0, -1.0, 1.0)


def settings_for(cfg) -> samplers.SamplerSettings:
  """The decoder's sampler settings from its config: the common ones plus `sampling.text_guidance_scale`."""
  text_scale = cfg.sampling.text_guidance_scale
  return dataclasses.replace(common.sampler_settings(cfg),
                             text_guidance_scale=None if text_scale is None else float(text_scale))


def make_sampler(cfg, unet: unet_lib.UNet, text_proj: UnCLIPTextProj | None,
                 diffusion: GaussianDiffusion | None = None, *, progress: Callable[[Any], None] | None = None,
                 sharding=None, text_encoder: GlideClipConditioning | None = None):
  """A jitted `(params, cond, x_T, rng, null_text=None, inpaint_image=None, inpaint_mask=None) -> [B, H, W, 3]`
  (`text_encoder`: the paper decoder's conditioning, for a `GlideClipCond`).

  Uses cfg.sampling (steps, sampler, guidance, clipping, `inpaint_method`, `resample_jumps`) and cfg.null_text
  ("zeros"; "empty_prompt" requires `null_text`, the CLIP encoding of "").
  """
  diffusion = diffusion or GaussianDiffusion.from_config(cfg.diffusion)
  settings = settings_for(cfg)
  null_choice = common.check_null_text(cfg.null_text)
  inpaint_method = cfg.sampling.inpaint_method
  resample_jumps = int(cfg.sampling.resample_jumps)

  def run(params, cond, x_T, rng, null_text=None, inpaint_image=None, inpaint_mask=None):
    if (null_text is None and null_choice == "empty_prompt" and settings.branches > 1
        and isinstance(cond, DecoderCond)):
      raise ValueError("null_text='empty_prompt' needs null_text (the CLIP encoding of the empty prompt)")
    return sample(params, cond, x_T, rng, unet=unet, text_proj=text_proj, diffusion=diffusion,
                  steps=cfg.sampling.steps, settings=settings, null_text=null_text, inpaint_image=inpaint_image,
                  inpaint_mask=inpaint_mask, inpaint_method=inpaint_method, resample_jumps=resample_jumps,
                  image_conditioning=bool(cfg.image_conditioning), progress=progress, sharding=sharding,
                  text_encoder=text_encoder)
  return jax.jit(run)


# ---- training -----------------------------------------------------------------------------------------------------
def loss_fn(params, batch, rng, *, unet, text_proj, diffusion: GaussianDiffusion, clip_drop_prob: float,
            text_drop_prob: float, image_conditioning: bool = True):
  """Decoder loss: hybrid (ε-MSE + λ·VLB) on images x0 [B, H, W, 3], conditioned through the text projection.

  The CLIP image embedding is replaced by the learned CFG embedding with prob `clip_drop_prob`; the text (token
  states, pooled embedding and mask) by zeros / an all-False mask with prob `text_drop_prob`, the null the
  sampler's unconditional branch uses. image_conditioning False (a text-only decoder): every image embedding is
  replaced (batch["image_emb"] is never seen).
  """
  x0 = batch["image"]
  b = x0.shape[0]
  t_rng, noise_rng, clip_rng, text_rng, dropout_rng = jax.random.split(rng, 5)
  drop_image = jax.random.bernoulli(clip_rng, clip_drop_prob if image_conditioning else 1.0, (b,))
  drop_text = jax.random.bernoulli(text_rng, text_drop_prob, (b,))
  null = common.zeros_null_text(b, batch["text_enc"].shape[1], batch["text_emb"].shape[1])   # the sampler's uncond text
  pick = lambda n, x: jnp.where(drop_text.reshape((b,) + (1,) * (x.ndim - 1)), n.astype(x.dtype), x)
  cond = text_proj.apply({"params": params["text_proj"]}, image_embeddings=batch["image_emb"],
                         prompt_embeds=pick(null.emb, batch["text_emb"]),
                         text_encoder_hidden_states=pick(null.enc, batch["text_enc"]),
                         text_mask=pick(null.mask, batch["text_mask"].astype(bool)), do_classifier_free_guidance=False,
                         drop_image=drop_image, method=type(text_proj).conditioning)
  return _denoising_loss(unet, params["unet"], diffusion, x0, cond, t_rng, noise_rng, dropout_rng)


def _denoising_loss(unet, unet_params, diffusion: GaussianDiffusion, x0, cond, t_rng, noise_rng, dropout_rng):
  """The hybrid loss of the UNet on x0 [B, H, W, 3] under the conditioning kwargs `cond` (B rows)."""
  t = diffusion.sample_timesteps(t_rng, x0.shape[0])
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  x_t = diffusion.q_sample(x0, t, noise)
  out = unet.apply({"params": unet_params}, x_t, t, deterministic=False, rngs={"dropout": dropout_rng}, **cond)
  terms = diffusion.loss_terms(out, x0, x_t, t, noise)
  loss = jnp.mean(terms["loss"])
  return loss, {"loss": loss, "mse": jnp.mean(terms["mse"]), "vb": jnp.mean(terms.get("vb", terms["mse"]))}


def loss_fn_glide_clip(params, batch, rng, *, unet, encoder: GlideClipConditioning, diffusion: GaussianDiffusion,
                       clip_drop_prob: float, text_drop_prob: float, image_conditioning: bool = True):
  """The paper decoder's loss (text_encoder "glide_clip"): `loss_fn`'s hybrid loss, conditioned through GLIDE's
  transformer on the caption tokens plus the CLIP image embedding. batch: image [B, H, W, 3], image_emb [B, E],
  tokens / text_mask [B, L] (cut or padded to text_ctx, `fit_tokens`). The image embedding is replaced by the learned null embedding
  with prob `clip_drop_prob` (every row when not image_conditioning), the caption by the empty one with prob
  `text_drop_prob` (the paper: 10 % and 50 %)."""
  x0 = batch["image"]
  b = x0.shape[0]
  t_rng, noise_rng, clip_rng, text_rng, dropout_rng = jax.random.split(rng, 5)
  drop_image = jax.random.bernoulli(clip_rng, clip_drop_prob if image_conditioning else 1.0, (b,))
  drop_text = jax.random.bernoulli(text_rng, text_drop_prob, (b,))
  text = encoder.text_encoder
  tokens, mask = fit_tokens(batch["tokens"], batch["text_mask"], text.text_ctx, text.end_token)
  tokens, mask = glide_text_lib.drop_text(tokens, mask, drop_text, text.end_token)
  cond = encoder.apply({"params": params["text_encoder"]}, tokens, mask, batch["image_emb"], drop_image)
  return _denoising_loss(unet, params["unet"], diffusion, x0, cond, t_rng, noise_rng, dropout_rng)


def make_task(cfg, *, data: Iterator[dict] | None = None, eval_data: Iterator[dict] | None = None,
              mesh=None) -> Task:
  """The decoder on images + their precomputed CLIP embeddings. Evaluation: samples for held examples' CLIP
  embeddings beside the real images, and their MSE. (`mesh` is unused: every task takes it.)"""
  del mesh
  pathway = cfg.model.text_encoder
  if pathway not in ("text_proj", "glide_clip"):
    raise ValueError(f"decoder training conditions through text_proj (precomputed CLIP embeddings) or glide_clip "
                     f"(caption tokens + CLIP image embeddings); model.text_encoder={pathway!r} is supported for "
                     "import and sampling only")
  models = build(cfg)
  keys = ("image",) + EMBEDDING_KEYS if pathway == "text_proj" else GLIDE_CLIP_KEYS
  data = data if data is not None else common.data_iterator(cfg, cfg.model.image_size)
  drops = dict(clip_drop_prob=cfg.clip_drop_prob, text_drop_prob=cfg.text_drop_prob,
               image_conditioning=bool(cfg.image_conditioning))

  evaluate = None
  held = common.eval_batch(cfg, eval_data, cfg.model.image_size, keys)
  if held is not None:
    sampler = make_sampler(cfg, models.unet, models.text_proj, models.diffusion, text_encoder=models.text_encoder)
    x_T = jax.random.normal(jax.random.key(cfg.seed + 2), held["image"].shape)
    if pathway == "text_proj":
      cond = DecoderCond(held["image_emb"], held["text_emb"], held["text_enc"], held["text_mask"])
    else:
      cond = GlideClipCond(held["image_emb"], held["tokens"], held["text_mask"])

    def evaluate(params):
      """Samples for the held examples' conditioning, shown beside the real images (top row)."""
      images = sampler(params, cond, x_T, jax.random.key(cfg.seed + 3))
      return {"samples": jnp.concatenate([held["image"], images]),
              "sample_mse": jnp.mean((images - held["image"]) ** 2)}

  if pathway == "text_proj":
    loss = functools.partial(loss_fn, unet=models.unet, text_proj=models.text_proj, diffusion=models.diffusion,
                             **drops)
  else:
    loss = functools.partial(loss_fn_glide_clip, unet=models.unet, encoder=models.text_encoder,
                             diffusion=models.diffusion, **drops)
  return Task(init_params=lambda rng: init_params(models, rng), loss_fn=loss,
              data=common.MappedIterator(data, lambda b: common.select(b, keys)), evaluate=evaluate)
