"""The super-resolution stage (64->256, 256->1024): conv-only UNets conditioned on the upsampled low-res image.

Everything about the stage but the Linen module (`models/unet.py`): building it from the config, the training
loss (ε-MSE on random crops with a degraded low-res condition, `data/degradations.py`) and task, and the sampler.

Every step the UNet sees cat([x_t, resize(low_res)]) (`common.model_input`, low-res AFTER the noisy input, as in
diffusers and Karlo); the resize (bicubic with antialias = Karlo/diffusers, or bilinear = GLIDE) is done once,
before the loop. No classifier-free guidance. x̂0 is clamped to ±1 and the output to [-1, 1].

Karlo's two-model split (diffusers' `super_res_first` / `super_res_last`): `params_first` (super_res_first) runs
every step except the last and `params_last` (super_res_last, fine-tuned for the final step) only the final one; `params_last=None` runs one
model for all steps. The switch is a `lax.cond` on the step's timestep inside the single `lax.scan`, so only the
selected model is evaluated.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp

from unclip_jax.diffusion import samplers
from unclip_jax.diffusion.gaussian import GaussianDiffusion
from unclip_jax.diffusion.schedules import step_table
from unclip_jax.models import unet as unet_lib
from unclip_jax.stages import builders, common
from unclip_jax.stages.common import IMAGE_CHANNELS, Task

Params = Any
DEFAULT_SETTINGS = samplers.SamplerSettings(guidance_scale=1.0, clip_range=1.0)


class Models(NamedTuple):
  """The upsampler stage's modules: the UNet and its Gaussian diffusion."""
  unet: unet_lib.UNet
  diffusion: GaussianDiffusion


def build(cfg, *, dtype=None) -> Models:
  """The stage's modules from a `configs/upsampler.py` config (dtype: default the config's compute dtype)."""
  unet = builders.unet(cfg.model, dtype=dtype or cfg.dtype, remat=cfg.remat_policy)
  diffusion = GaussianDiffusion.from_config(cfg.diffusion)
  common.check_output_channels(unet, diffusion, "super-res")
  return Models(unet, diffusion)


def init_params(models: Models, rng: jax.Array) -> Params:
  return builders.init_unet(models.unet, rng)


def abstract_params(cfg) -> Params:
  """Shapes/dtypes of the stage's params (nothing allocated)."""
  return builders.abstract(init_params, build(cfg, dtype="float32"))


def conditioning_of(unet: unet_lib.UNet) -> str:
  """"low_res" (6 input channels: [x_t, upsampled]) or "inpaint_low_res" (10: [x_t, image·mask, mask, low-res])."""
  return common.conditioning_of(unet, ("low_res", "inpaint_low_res"), "super-res")


def model_fn_for(unet: unet_lib.UNet, params: Params, upsampled: jax.Array, *, inpaint_image: jax.Array | None = None,
                 inpaint_mask: jax.Array | None = None):
  """`model_fn(x [B, H, W, 3], t [B]) -> ε [B, H, W, 3]` given the low-res condition already at [B, H, W, 3]."""
  conditioning = conditioning_of(unet)

  def fn(x, t):
    # `upsampled` has x's size, so the resize inside model_input is the identity.
    inp = common.model_input(x, conditioning=conditioning, low_res=upsampled, inpaint_image=inpaint_image,
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
  common.check_output_channels(unet, diffusion, "super-res")
  conditioning = conditioning_of(unet)
  image, mask = common.check_inpaint(x_T, inpaint_image, inpaint_mask)
  if image is not None and conditioning != "inpaint_low_res":
    raise ValueError("inpaint_image/inpaint_mask need a UNet with conditioning='inpaint_low_res' (10 channels)")
  upsampled = common.upsample_low_res(low_res, (hh, ww), resize_method)
  last_t = int(step_table(diffusion.schedule, steps, settings.single_step_beta).timesteps[-1])
  model_fn = two_model_fn(unet, params_first, params_last, upsampled, last_t, inpaint_image=image,
                          inpaint_mask=mask)
  paste = samplers.paste_known(image, mask) if image is not None else None      # GLIDE's inpainting notebook
  x0 = samplers.sample(model_fn, x_T, rng, diffusion=diffusion, steps=steps, settings=settings, progress=progress,
                       sharding=sharding, denoised_fn=paste)
  return jnp.clip(x0, -1.0, 1.0)


def make_sampler(cfg, unet: unet_lib.UNet, diffusion: GaussianDiffusion | None = None, *,
                 progress: Callable[[Any], None] | None = None, sharding=None):
  """A jitted `(params_first, params_last, low_res, x_T, rng) -> [B, H, W, 3]` from configs/upsampler.py.

  With `cfg.last_step_model` True, params_last is required (Karlo's super_res_last); with False it must be None.
  """
  diffusion = diffusion or GaussianDiffusion.from_config(cfg.diffusion)
  settings = common.sampler_settings(cfg)
  two_models = bool(cfg.last_step_model)
  resize_method = cfg.model.resize_method

  def run(params_first, params_last, low_res, x_T, rng):
    if two_models and params_last is None:
      raise ValueError("cfg.last_step_model is True: pass params_last (the final-step model, super_res_last)")
    if not two_models and params_last is not None:
      raise ValueError("cfg.last_step_model is False: params_last must be None (one model for every step)")
    return sample(params_first, params_last, low_res, x_T, rng, unet=unet, diffusion=diffusion,
                  steps=cfg.sampling.steps, settings=settings, resize_method=resize_method, progress=progress,
                  sharding=sharding)
  return jax.jit(run)


# ---- training -----------------------------------------------------------------------------------------------------
def loss_fn(params, batch, rng, *, unet, diffusion: GaussianDiffusion, make_pair, conditioning: str,
            resize_method: str):
  """ε-MSE on random crops of the full-size images [B, H, W, 3], conditioned on a degraded low-res version of
  the crop (`make_pair(rng, images) -> (x0, low_res)`)."""
  pair_rng, t_rng, noise_rng, dropout_rng = jax.random.split(rng, 4)
  x0, low_res = make_pair(pair_rng, batch["image"])
  t = diffusion.sample_timesteps(t_rng, x0.shape[0])
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  x_t = diffusion.q_sample(x0, t, noise)
  inp = common.model_input(x_t, conditioning=conditioning, low_res=low_res, resize_method=resize_method)
  out = unet.apply({"params": params}, inp, t, deterministic=False, rngs={"dropout": dropout_rng})
  loss = jnp.mean(diffusion.loss_terms(out, x0, x_t, t, noise)["loss"])
  return loss, {"loss": loss}


def make_task(cfg, *, data: Iterator[dict] | None = None, eval_data: Iterator[dict] | None = None,
              mesh=None) -> Task:
  """The upsampler on full-size images. Evaluation: upsampling of held images' clean low-res versions (rows:
  bicubic, ours, target) and PSNRs. (`mesh` is unused: every task takes it.)"""
  from unclip_jax.data import degradations

  del mesh
  if cfg.model.conditioning != "low_res":
    raise ValueError(f"upsampler training supports model.conditioning='low_res', got {cfg.model.conditioning!r}")
  models = build(cfg)
  data = data if data is not None else common.data_iterator(cfg, cfg.model.image_size)
  evaluate = None
  held = common.eval_batch(cfg, eval_data, cfg.model.image_size, ("image",))
  if held is not None:
    if cfg.last_step_model:
      logging.info("upsampler evaluation samples every step with the model being trained (no last-step model)")
    sampler = jax.jit(functools.partial(
        sample, unet=models.unet, diffusion=models.diffusion, steps=cfg.sampling.steps,
        settings=common.sampler_settings(cfg), resize_method=cfg.model.resize_method))
    low = cfg.model.low_res_size
    low_res = jax.image.resize(held["image"], (held["image"].shape[0], low, low, 3), "bicubic")
    x_T = jax.random.normal(jax.random.key(cfg.seed + 2), held["image"].shape)

    def evaluate(params):
      """Full-size upsampling of the held images' clean low-res versions (rows: bicubic, ours, target)."""
      images = sampler(params, None, low_res, x_T, jax.random.key(cfg.seed + 3))
      bicubic = jax.image.resize(low_res, images.shape, "bicubic")
      mse = jnp.mean((images - held["image"]) ** 2)
      return {"samples": jnp.concatenate([jnp.clip(bicubic, -1, 1), images, held["image"]]),
              "psnr": 10 * jnp.log10(4.0 / mse),
              "bicubic_psnr": 10 * jnp.log10(4.0 / jnp.mean((bicubic - held["image"]) ** 2))}

  loss = functools.partial(loss_fn, unet=models.unet, diffusion=models.diffusion,
                           make_pair=degradations.training_pair_from_config(cfg),
                           conditioning=cfg.model.conditioning, resize_method=cfg.model.resize_method)
  return Task(init_params=lambda rng: init_params(models, rng), loss_fn=loss,
              data=common.MappedIterator(data, lambda b: common.select(b, ("image",))), evaluate=evaluate)
