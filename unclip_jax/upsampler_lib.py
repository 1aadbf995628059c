"""Super-resolution samplers (64->256, 256->1024): conv-only UNets conditioned on the upsampled low-res image.

Every step the UNet sees cat([x_t, resize(low_res)]) (`unet.model_input`, low-res AFTER the noisy input,
ARCHITECTURE.md §15.12); the resize (bicubic with antialias = Karlo/diffusers, or bilinear = GLIDE) is done once,
before the loop. No classifier-free guidance. x̂0 is clamped to ±1 and the output to [-1, 1].

Karlo's two-model split (§4.4, §7): `params_first` (super_res_first) runs every step except the last and
`params_last` (super_res_last, fine-tuned for the final step) only the final one; `params_last=None` runs one
model for all steps. The switch is a `lax.cond` on the step's timestep inside the single `lax.scan`, so only the
selected model is evaluated.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from unclip_jax.decoder_lib import check_inpaint
from unclip_jax.diffusion import samplers
from unclip_jax.diffusion.gaussian import GaussianDiffusion
from unclip_jax.diffusion.schedules import step_table
from unclip_jax.models import unet as unet_lib

Params = Any
IMAGE_CHANNELS = 3
DEFAULT_SETTINGS = samplers.SamplerSettings(guidance_scale=1.0, clip_range=1.0)


def conditioning_of(unet: unet_lib.UNet) -> str:
  """"low_res" (6 input channels) or "inpaint_low_res" (10: [x_t, image·mask, mask, low-res])."""
  for name in ("low_res", "inpaint_low_res"):
    if unet.in_channels == unet_lib.input_channels(IMAGE_CHANNELS, name):
      return name
  raise ValueError(f"super-res UNet has in_channels={unet.in_channels}; expected 6 (conditioning 'low_res': "
                   "[x_t, upsampled]) or 10 ('inpaint_low_res')")


def model_fn_for(unet: unet_lib.UNet, params: Params, upsampled: jax.Array, *, inpaint_image: jax.Array | None = None,
                 inpaint_mask: jax.Array | None = None):
  """`model_fn(x [B, H, W, 3], t [B]) -> ε [B, H, W, 3]` given the low-res condition already at [B, H, W, 3]."""
  conditioning = conditioning_of(unet)

  def fn(x, t):
    # `upsampled` has x's size, so the resize inside model_input is the identity.
    inp = unet_lib.model_input(x, conditioning=conditioning, low_res=upsampled, inpaint_image=inpaint_image,
                               inpaint_mask=inpaint_mask)
    return unet.apply({"params": params}, inp, t)
  return fn


def two_model_fn(unet: unet_lib.UNet, params_first: Params, params_last: Params | None, upsampled: jax.Array,
                 last_t: int, **inpaint):
  """model_fn using `params_last` when t == last_t (the final sampling step) and `params_first` otherwise."""
  first = model_fn_for(unet, params_first, upsampled, **inpaint)
  if params_last is None:
    return first
  last = model_fn_for(unet, params_last, upsampled, **inpaint)

  def fn(x, t):
    return jax.lax.cond(t[0] == last_t, last, first, x, t)
  return fn


def sample(params_first: Params, params_last: Params | None, low_res: jax.Array, x_T: jax.Array, rng: jax.Array, *,
           unet: unet_lib.UNet, diffusion: GaussianDiffusion, steps: str | int = "7",
           settings: samplers.SamplerSettings = DEFAULT_SETTINGS, resize_method: str = "bicubic",
           inpaint_image: jax.Array | None = None, inpaint_mask: jax.Array | None = None,
           progress: Callable[[Any], None] | None = None, sharding=None) -> jax.Array:
  """Upsamples `low_res` (traceable; jit the caller, or use `make_sampler`).

  Args:
    params_first: UNet params for every step but the last (all steps when params_last is None).
    params_last: UNet params for the final step only, or None.
    low_res: [B, h, w, 3] in [-1, 1] (the decoder's output).
    x_T: [B, H, W, 3] initial noise; H, W is the output size.
    rng: per-step noise key (step i: `samplers.step_noise(rng, i, x_T.shape, ...)`).
    settings: must be unguided (guidance_scale 1).
    resize_method: "bicubic" (= torch bicubic + antialias, Karlo) or "bilinear" (GLIDE).
    inpaint_image, inpaint_mask: for 10-channel "inpaint_low_res" UNets ([B, H, W, 3] at the output size,
      [B, H, W(, 1)], 1 = known): the UNet sees [x_t, image·mask, mask, upsampled] and the known pixels are pasted
      into x̂0 every step, as in GLIDE's inpainting notebook.
  Returns:
    [B, H, W, 3] float32 images in [-1, 1].
  """
  if settings.guidance_scale != 1.0:
    raise ValueError(f"the upsamplers run unguided: guidance_scale must be 1, got {settings.guidance_scale}")
  if x_T.ndim != 4 or x_T.shape[-1] != IMAGE_CHANNELS:
    raise ValueError(f"x_T must be [B, H, W, {IMAGE_CHANNELS}] (NHWC), got {tuple(x_T.shape)}")
  b, hh, ww, c = x_T.shape
  if low_res.ndim != 4 or low_res.shape[0] != b or low_res.shape[-1] != c:
    raise ValueError(f"low_res must be [{b}, h, w, {c}] (NHWC, batch of x_T), got {tuple(low_res.shape)}")
  if unet.out_channels != diffusion.output_channels(IMAGE_CHANNELS):
    raise ValueError(f"super-res out_channels={unet.out_channels} but variance {diffusion.variance!r} needs "
                     f"{diffusion.output_channels(IMAGE_CHANNELS)}")
  conditioning = conditioning_of(unet)
  image, mask = check_inpaint(x_T, inpaint_image, inpaint_mask)
  if image is not None and conditioning != "inpaint_low_res":
    raise ValueError("inpaint_image/inpaint_mask need a UNet with conditioning='inpaint_low_res' (10 channels)")
  upsampled = unet_lib.upsample_low_res(low_res, (hh, ww), resize_method)
  last_t = int(step_table(diffusion.schedule, steps, settings.single_step_beta).timesteps[-1])
  model_fn = two_model_fn(unet, params_first, params_last, upsampled, last_t, inpaint_image=image,
                          inpaint_mask=mask)
  paste = samplers.paste_known(image, mask) if image is not None else None      # GLIDE's inpainting notebook
  x0 = samplers.sample(model_fn, x_T, rng, diffusion=diffusion, steps=steps, settings=settings, progress=progress,
                       sharding=sharding, denoised_fn=paste)
  return jnp.clip(x0, -1.0, 1.0)


def settings_from_config(cfg) -> samplers.SamplerSettings:
  """SamplerSettings from the upsampler config's `sampling` block."""
  return samplers.SamplerSettings.from_config(cfg.sampling)


def make_sampler(cfg, unet: unet_lib.UNet, diffusion: GaussianDiffusion | None = None, *,
                 progress: Callable[[Any], None] | None = None, sharding=None):
  """A jitted `(params_first, params_last, low_res, x_T, rng) -> [B, H, W, 3]` from configs/upsampler.py.

  With `cfg.last_step_model` True, params_last is required (Karlo's super_res_last); with False it must be None.
  """
  diffusion = diffusion or GaussianDiffusion.from_config(cfg.diffusion)
  settings = settings_from_config(cfg)
  two_models = bool(cfg.get("last_step_model", False))
  resize_method = cfg.model.get("resize_method", "bicubic")

  def run(params_first, params_last, low_res, x_T, rng):
    if two_models and params_last is None:
      raise ValueError("cfg.last_step_model is True: pass params_last (the final-step model, super_res_last)")
    if not two_models and params_last is not None:
      raise ValueError("cfg.last_step_model is False: params_last must be None (one model for every step)")
    return sample(params_first, params_last, low_res, x_T, rng, unet=unet, diffusion=diffusion,
                  steps=cfg.sampling.steps, settings=settings, resize_method=resize_method, progress=progress,
                  sharding=sharding)
  return jax.jit(run)
