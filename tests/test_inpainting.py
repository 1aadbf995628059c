"""Inpainting: RePaint (exact Gaussian conditional statistics, exact known region, noise streams) and GLIDE-style
inpainting models (their input channels, and sampling vs a diffusers UNet + UnCLIPScheduler reference loop)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
import diffusers.schedulers.scheduling_unclip as scheduling_unclip  # noqa: E402

from unclip_jax.stages import decoder as decoder_lib  # noqa: E402
from unclip_jax.diffusion import gaussian, samplers, schedules  # noqa: E402
from unclip_jax.diffusion.gaussian import GaussianDiffusion  # noqa: E402
from unclip_jax.diffusion.schedules import NoiseSchedule  # noqa: E402
from unclip_jax.models import unet as unet_lib  # noqa: E402
from unclip_jax.stages import builders, common  # noqa: E402

import helpers  # noqa: E402
from helpers import TP_KW, convert_decoder, decoder_diffusion, fake_randn_from, nchw, nhwc  # noqa: E402

UnCLIPTextProjModel = helpers.unclip_text_proj_class()

SIGMA, RHO, KNOWN = 0.5, 0.9, 0.8
B, L, E, S = 2, 16, 32, 16


# ---- RePaint on a Gaussian with a known optimal denoiser -----------------------------------------------------------
def _gaussian_pair_model(diffusion):
  """The exact ε̂(x_t, t) for 2-pixel data x0 ~ N(0, Σ), Σ = σ²[[1, ρ], [ρ, 1]]; x is [N, 1, 2, 1]."""
  cov = SIGMA ** 2 * jnp.array([[1.0, RHO], [RHO, 1.0]])
  alphas_cumprod = jnp.asarray(diffusion.schedule.alphas_cumprod)

  def model_fn(x, t):
    a = alphas_cumprod[t][:, None, None]                                                   # [N, 1, 1]
    gain = jnp.sqrt(a) * cov @ jnp.linalg.inv(a * cov + (1.0 - a) * jnp.eye(2))          # E[x0|x_t] = gain·x_t
    v = x[:, 0, :, 0]
    x0 = jnp.einsum("nij,nj->ni", gain, v)
    eps = (v - jnp.sqrt(a[:, 0]) * x0) / jnp.sqrt(1.0 - a[:, 0])
    return eps[:, None, :, None]
  return model_fn


@pytest.mark.parametrize("resample_jumps", [20, 1])
def test_repaint_gaussian_conditional_statistics(resample_jumps):
  """Pixel 0 known (= 0.8): with r = 20 resampling jumps the unknown pixel follows the exact conditional
  N(ρ·0.8, σ²(1-ρ²)) = N(0.72, 0.218²) (2%/5%); without resampling (r = 1) its mean is far off, which is the point
  of RePaint. The known pixel ends exactly at its value."""
  diffusion = gaussian.GaussianDiffusion(schedules.NoiseSchedule.create("cosine", 1000), prediction="eps",
                                         variance="fixed_large")
  n = 4096
  known = jnp.zeros((n, 1, 2, 1)).at[:, 0, 0, 0].set(KNOWN)
  mask = jnp.zeros((1, 1, 2, 1)).at[0, 0, 0, 0].set(1.0)                                  # broadcast over N
  settings = samplers.SamplerSettings(method="ddpm", clip_range=None)
  run = jax.jit(lambda x, r: samplers.repaint_sample(_gaussian_pair_model(diffusion), x, r, known=known, mask=mask,
                                                       diffusion=diffusion, steps="100", settings=settings,
                                                       resample_jumps=resample_jumps))
  out = np.asarray(run(jax.random.normal(jax.random.key(0), (n, 1, 2, 1)), jax.random.key(1)))
  np.testing.assert_array_equal(out[:, 0, 0, 0], np.float32(KNOWN))
  unknown = out[:, 0, 1, 0]
  want_mean, want_std = RHO * KNOWN, SIGMA * np.sqrt(1 - RHO ** 2)
  print(f"RePaint r={resample_jumps}: unknown mean {unknown.mean():.3f} (exact {want_mean:.3f}), "
        f"std {unknown.std():.3f} (exact {want_std:.3f})")
  if resample_jumps > 1:
    assert abs(unknown.mean() / want_mean - 1) < 0.02 and abs(unknown.std() / want_std - 1) < 0.05
  else:
    assert unknown.mean() < want_mean - 0.1


def test_repaint_without_known_pixels_is_plain_sampling():
  """r = 1 and an all-zero mask reduce RePaint to `samplers.sample` with the documented reverse-step key."""
  diffusion = gaussian.GaussianDiffusion(schedules.NoiseSchedule.create("cosine", 1000), variance="learned_range")
  w = jax.random.normal(jax.random.key(7), (3, 6)) * 0.5
  model_fn = lambda x, t: jnp.tanh(x @ w + t[:, None, None, None] / 1000.0)
  x_T = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  settings = samplers.SamplerSettings(guidance_scale=1.0)
  rng = jax.random.key(1)
  painted = samplers.repaint_sample(model_fn, x_T, rng, known=jnp.ones_like(x_T), mask=jnp.zeros((2, 4, 4, 1)),
                                    diffusion=diffusion, steps="6", settings=settings)
  plain = samplers.sample(model_fn, x_T, jax.random.fold_in(samplers.repaint_keys(rng)[0], 0), diffusion=diffusion,
                          steps="6", settings=settings)
  np.testing.assert_allclose(np.asarray(painted), np.asarray(plain), atol=1e-6)
  again = samplers.repaint_sample(model_fn, x_T, rng, known=jnp.ones_like(x_T), mask=jnp.zeros((2, 4, 4, 1)),
                                  diffusion=diffusion, steps="6", settings=settings, resample_jumps=3)
  assert float(jnp.abs(again - painted).max()) > 1e-3                       # the repetitions draw fresh noise


# ---- the tiny decoder (diffusers twin, random weights) -------------------------------------------------------------

def _inputs():
  rng = np.random.default_rng(0)
  cond = decoder_lib.DecoderCond(*(jnp.asarray(a, jnp.float32) for a in (
      rng.standard_normal((B, E)), rng.standard_normal((B, E)), rng.standard_normal((B, L, E)))),
      jnp.asarray(np.arange(L)[None, :] < np.array([[5], [L]])))
  image = jnp.asarray(np.tanh(rng.standard_normal((B, S, S, 3))), jnp.float32)
  mask = np.zeros((B, S, S), np.float32)
  mask[0, :, : S // 2] = 1.0                                                     # left half known
  mask[1, 4:12, 4:12] = 1.0                                                      # a centre square known
  return cond, image, jnp.asarray(mask)


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
  """The tiny Karlo decoder (3 input channels) and a GLIDE-style inpainting twin (7 input channels)."""
  torch.manual_seed(0)
  tp = helpers.randomize(UnCLIPTextProjModel(**TP_KW), 5)
  plain = helpers.randomize(diffusers.UNet2DConditionModel(**helpers.DECODER_KW), 1)
  glide = helpers.randomize(diffusers.UNet2DConditionModel(**{**helpers.DECODER_KW, "in_channels": 7}), 2)
  tmp = tmp_path_factory.mktemp("inpainting")
  out = {}
  for name, torch_unet in (("plain", plain), ("glide", glide)):
    (tmp / name).mkdir()
    unet, text_proj, params = convert_decoder(torch_unet, tp, tmp / name)
    out[name] = dict(torch=torch_unet, unet=unet, text_proj=text_proj, params=params)
  out["torch_tp"] = tp
  assert out["glide"]["unet"].in_channels == 7 and decoder_lib.conditioning_of(out["glide"]["unet"]) == "inpaint"
  return out


def test_repaint_decoder_keeps_known_region(decoders):
  """RePaint through decoder_lib.sample (Karlo-style 3-channel decoder, g=3, r=2): the known pixels end exactly
  equal to the image (the last replacement is q_sample at ᾱ=1); the unknown ones are generated and depend on the
  known ones (they differ from plain sampling and from the image)."""
  d = decoders["plain"]
  cond, image, mask = _inputs()
  settings = samplers.SamplerSettings(guidance_scale=3.0, clip_range=1.0)
  run = jax.jit(lambda p, x, r, img, m: decoder_lib.sample(
      p, cond, x, r, unet=d["unet"], text_proj=d["text_proj"], diffusion=decoder_diffusion(), steps="6",
      settings=settings, inpaint_image=img, inpaint_mask=m, resample_jumps=2))
  x_T = jax.random.normal(jax.random.key(1), (B, S, S, 3))
  out = np.asarray(run(d["params"], x_T, jax.random.key(2), image, mask))
  m = np.asarray(mask).astype(bool)
  np.testing.assert_array_equal(out[m], np.asarray(image)[m])
  other = np.asarray(run(d["params"], x_T, jax.random.key(2), -image, mask))       # different known pixels
  np.testing.assert_array_equal(other[m], -np.asarray(image)[m])
  assert np.abs(out[~m] - np.asarray(image)[~m]).mean() > 0.1
  assert np.abs(out[~m] - other[~m]).mean() > 1e-2


def test_glide_model_input_has_masked_image_and_mask(decoders):
  """The 7-channel UNet sees cat([x_t, image·mask, mask]) (repeated over the [uncond; cond] rows)."""
  d = decoders["glide"]
  cond, image, mask = _inputs()
  kw = decoder_lib.decoder_cond(d["text_proj"], d["params"]["text_proj"], image_emb=cond.image_emb,
                                text_emb=cond.text_emb, text_enc=cond.text_enc, text_mask=cond.text_mask,
                                guidance=True)
  model_fn = decoder_lib.model_fn_for(d["unet"], d["params"]["unet"], kw, inpaint_image=image,
                                      inpaint_mask=mask[..., None])
  seen = []

  def spy(next_fun, args, kwargs, context):       # records the UNet's input and skips the forward
    if isinstance(context.module, unet_lib.UNet) and context.method_name == "__call__":
      seen.append(np.asarray(args[0]))
      return jnp.zeros(args[0].shape[:-1] + (6,))
    return next_fun(*args, **kwargs)

  x = jax.random.normal(jax.random.key(0), (2 * B, S, S, 3))
  with nn.intercept_methods(spy):
    model_fn(x, jnp.full((2 * B,), 500))
  (inp,) = seen
  img2, m2 = np.concatenate([np.asarray(image)] * 2), np.concatenate([np.asarray(mask)[..., None]] * 2)
  assert inp.shape == (2 * B, S, S, 7)
  np.testing.assert_array_equal(inp[..., :3], np.asarray(x))
  np.testing.assert_array_equal(inp[..., 3:6], img2 * m2)
  np.testing.assert_array_equal(inp[..., 6:], m2)


def diffusers_glide_inpaint_loop(text_proj, decoder, scheduler, image_emb, prompt_embeds, text_enc, text_mask,
                                 latents, image, mask, guidance_scale, steps):
  """UnCLIPPipeline's decoder loop with a 7-channel UNet fed cat([x_t, image·mask, mask]) and the known pixels
  pasted into x̂0 before every scheduler step (GLIDE's inpainting notebook). diffusers' scheduler derives x̂0
  from ε, so the pasted x̂0 is passed as the ε it implies: ε' = (x_t - √ᾱ·x̂0') / √(1-ᾱ)."""
  with torch.no_grad():
    ehs, add = text_proj(image_embeddings=image_emb, prompt_embeds=prompt_embeds,
                         text_encoder_hidden_states=text_enc, do_classifier_free_guidance=True)
    dmask = torch.nn.functional.pad(text_mask, (4, 0), value=True)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    extra = torch.cat([image * mask, mask], dim=1)
    for i, t in enumerate(timesteps):
      inp = torch.cat([torch.cat([latents, extra], dim=1)] * 2)
      out = decoder(sample=inp, timestep=t, encoder_hidden_states=ehs, class_labels=add, attention_mask=dmask).sample
      uncond, cond = out.chunk(2)
      eps = uncond[:, :3] + guidance_scale * (cond[:, :3] - uncond[:, :3])
      a = scheduler.alphas_cumprod[t]
      x0 = (latents - (1 - a) ** 0.5 * eps) / a ** 0.5
      x0 = x0 * (1 - mask) + image * mask
      eps = (latents - a ** 0.5 * x0) / (1 - a) ** 0.5
      prev = None if i + 1 == timesteps.shape[0] else timesteps[i + 1]
      latents = scheduler.step(torch.cat([eps, cond[:, 3:]], dim=1), t, latents, prev_timestep=prev).prev_sample
    return latents.clamp(-1, 1)


def test_glide_inpainting_matches_diffusers_reference(decoders, monkeypatch):
  d = decoders["glide"]
  cond, image, mask = _inputs()
  steps, g = 10, 3.0
  settings = samplers.SamplerSettings(guidance_scale=g, clip_range=1.0, single_step_beta="schedule")
  x_T = jax.random.normal(jax.random.key(3), (B, S, S, 3))
  rng = jax.random.key(4)
  got = np.asarray(jax.jit(lambda p: decoder_lib.sample(
      p, cond, x_T, rng, unet=d["unet"], text_proj=d["text_proj"], diffusion=decoder_diffusion(), steps=str(steps),
      settings=settings, inpaint_image=image, inpaint_mask=mask))(d["params"]))     # "auto" -> "glide"

  calls = []
  noises = [nchw(samplers.step_noise(rng, i, x_T.shape, jnp.float32)) for i in range(steps)]
  monkeypatch.setattr(scheduling_unclip, "randn_tensor", fake_randn_from(noises, calls))
  t = lambda x: torch.from_numpy(np.array(x))
  zeros = common.zeros_null_text(B, L, E)
  want = nhwc(diffusers_glide_inpaint_loop(
      decoders["torch_tp"], d["torch"], diffusers.UnCLIPScheduler(variance_type="learned_range",
                                                                  prediction_type="epsilon"),
      t(cond.image_emb), torch.cat([t(zeros.emb), t(cond.text_emb)]), torch.cat([t(zeros.enc), t(cond.text_enc)]),
      torch.cat([t(zeros.mask), t(cond.text_mask)]), nchw(x_T), nchw(image), nchw(mask[..., None]), g, steps))
  assert len(calls) == steps - 1
  err = np.abs(got - want).max()
  m = np.asarray(mask).astype(bool)
  known_err = np.abs(got[m] - np.asarray(image)[m]).max()
  print(f"GLIDE inpainting (g={g}, {steps} steps) max|Δ| vs diffusers reference = {err:.2e}; "
        f"known pixels vs image {known_err:.2e}")
  np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
  assert known_err < 1e-3                        # the final x̂0 paste (ᾱ_prev = 1) leaves the known pixels in place


def test_glide_upsampler_inpainting_keeps_known_region(tmp_path):
  """A 10-channel "inpaint_low_res" upsampler (the tiny super-res twin with 10 input channels, random weights)
  pastes the known pixels into x̂0 every step: with the "ratio" single-step β the last step returns x̂0, so they
  end exactly in place."""
  from unclip_jax.stages import upsampler as upsampler_lib
  from unclip_jax.convert import unet as convert_unet

  helpers.randomize(diffusers.UNet2DModel(**{**helpers.SR_KW, "in_channels": 10}), 4).save_pretrained(tmp_path)
  cfg, params = convert_unet.load_diffusers_unet(tmp_path)
  assert cfg.conditioning == "inpaint_low_res"
  unet = builders.unet(cfg, dtype="float32")
  rng = np.random.default_rng(1)
  high, low = 32, 16
  image = jnp.asarray(np.tanh(rng.standard_normal((B, high, high, 3))), jnp.float32)
  mask = jnp.zeros((B, high, high)).at[:, : high // 2].set(1.0)                   # top half known
  low_res = jnp.asarray(np.tanh(rng.standard_normal((B, low, low, 3))), jnp.float32)
  diffusion = GaussianDiffusion(NoiseSchedule.create("cosine", 1000), variance="fixed_small_log")
  out = np.asarray(jax.jit(lambda p: upsampler_lib.sample(
      p, None, low_res, jax.random.normal(jax.random.key(2), image.shape), jax.random.key(3), unet=unet,
      diffusion=diffusion, steps="3", inpaint_image=image, inpaint_mask=mask))(params))
  m = np.asarray(mask).astype(bool)
  np.testing.assert_array_equal(out[m], np.asarray(image)[m])
  assert np.abs(out[~m] - np.asarray(image)[~m]).mean() > 0.1


def test_bad_inpainting_inputs(decoders):
  d = decoders["plain"]
  cond, image, mask = _inputs()
  kw = dict(unet=d["unet"], text_proj=d["text_proj"], diffusion=decoder_diffusion(), steps="2")
  x_T = jnp.zeros((B, S, S, 3))
  run = lambda img, m, **extra: decoder_lib.sample(d["params"], cond, x_T, jax.random.key(0), inpaint_image=img,
                                                   inpaint_mask=m, **{**kw, **extra})
  with pytest.raises(ValueError, match=r"inpaint_mask must be \[B, H, W, 1\] = \[2, 16, 16, 1\] or \[B, H, W\] = "
                                       r"\[2, 16, 16\] \(1 = known pixel\), got \(2, 8, 8\)"):
    run(image, mask[:, :8, :8])
  with pytest.raises(ValueError, match=r"inpaint_mask must be .* got \(2, 16, 16, 3\)"):
    run(image, jnp.stack([mask] * 3, -1))
  with pytest.raises(ValueError, match=r"inpaint_image must be \[B, H, W, C\] = \[2, 16, 16, 3\]"):
    run(image[..., :1], mask)
  with pytest.raises(ValueError, match="resample_jumps must be an integer >= 1"):
    run(image, mask, resample_jumps=0)
  model_fn = lambda x, t: x
  diffusion = GaussianDiffusion(NoiseSchedule.create("cosine", 1000))
  with pytest.raises(ValueError, match=r"mask of shape \(2, 8, 8, 1\) does not broadcast"):
    samplers.repaint_sample(model_fn, x_T, jax.random.key(0), known=x_T, mask=jnp.ones((B, 8, 8, 1)),
                            diffusion=diffusion, steps="2")
  with pytest.raises(ValueError, match="known image must have the latents' shape"):
    samplers.repaint_sample(model_fn, x_T, jax.random.key(0), known=x_T[:1], mask=jnp.ones((B, S, S, 1)),
                            diffusion=diffusion, steps="2")
