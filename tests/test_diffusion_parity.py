"""Per-step parity of our update rules with diffusers' UnCLIPScheduler, DDPMScheduler and DDIMScheduler.

Both sides get the same x_t, model output and noise at every step; diffusers draws its noise from a seeded
torch generator inside `step`, and we draw the identical tensor from a generator with the same seed.
"""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UnCLIPScheduler

import jax.numpy as jnp
from unclip_jax.diffusion import gaussian, samplers, schedules

T = 1000
SHAPE = (3, 8)          # [B, C]: 2-D so torch's channel axis (1) is also our last axis
ATOL = 1e-5


def _diffusion(prediction, variance):
  return gaussian.GaussianDiffusion(schedules.NoiseSchedule.create("cosine", T), prediction=prediction,
                                    variance=variance)


def _model_output(rng, learned):
  out = rng.standard_normal(SHAPE).astype(np.float32)
  if learned:
    out = np.concatenate([out, rng.uniform(-1, 1, SHAPE).astype(np.float32)], axis=-1)
  return out


def _torch_noise(seed):
  return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _step(table, i):
  return {k: jnp.asarray(v[i]) for k, v in table.as_scan_inputs().items()}


def _ours(diffusion, settings, table, i, out, x, noise):
  step = _step(table, i)
  x0, eps, v = samplers.denoise(diffusion, settings, jnp.asarray(out), jnp.asarray(x), step["alpha_bar"])
  if settings.method == "ddpm":
    return np.asarray(samplers.ddpm_update(diffusion, jnp.asarray(x), x0, v, step, jnp.asarray(noise)))
  if settings.recompute_eps:
    eps = gaussian.eps_from_x0(jnp.asarray(x), x0, step["alpha_bar"])
  return np.asarray(samplers.ddim_update(jnp.asarray(x), x0, eps, step, jnp.asarray(noise), settings.eta))


def test_cosine_tables_match_diffusers():
  ours = schedules.NoiseSchedule.create("cosine", T)
  ref = UnCLIPScheduler()
  np.testing.assert_array_equal(ours.betas, ref.betas.numpy())
  np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())


def test_linear_tables_match_diffusers():
  ours = schedules.NoiseSchedule.create("linear", T)
  ref = DDPMScheduler(beta_schedule="linear")
  np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=1e-6)
  np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5)


@pytest.mark.parametrize("n", [7, 25, 50, 100])
def test_respacing_matches_diffusers(n):
  unclip = UnCLIPScheduler()
  unclip.set_timesteps(n)
  np.testing.assert_array_equal(schedules.step_table(schedules.NoiseSchedule.create(), str(n)).timesteps,
                                unclip.timesteps.numpy())


@pytest.mark.parametrize("n", [25, 50, 100])
def test_ddim_respacing_matches_leading_spacing(n):
  # "ddimN" is GLIDE's integer-stride spacing; it equals diffusers' "leading" spacing when N divides T.
  ddpm = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
  ddpm.set_timesteps(n)
  np.testing.assert_array_equal(schedules.respace(f"ddim{n}", T)[::-1], ddpm.timesteps.numpy())


@pytest.mark.parametrize("variance", ["fixed_small_log", "learned_range"])
@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
def test_unclip_scheduler_steps(variance, prediction):
  clip_range = 5.0 if prediction == "sample" else 1.0
  ref = UnCLIPScheduler(variance_type=variance, prediction_type=prediction, clip_sample_range=clip_range)
  ref.set_timesteps(25)
  diffusion = _diffusion({"epsilon": "eps", "sample": "x0"}[prediction], variance)
  settings = samplers.SamplerSettings(method="ddpm", clip_range=clip_range, single_step_beta="schedule")
  table = schedules.step_table(diffusion.schedule, "25", "schedule")
  rng = np.random.default_rng(0)
  x = rng.standard_normal(SHAPE).astype(np.float32)
  timesteps = ref.timesteps.tolist()
  for i, t in enumerate(timesteps):
    out = _model_output(rng, variance == "learned_range") * (3.0 if prediction == "sample" else 1.0)
    prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
    want = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), prev_timestep=prev,
                    generator=torch.Generator().manual_seed(i)).prev_sample.numpy()
    got = _ours(diffusion, settings, table, i, out, x, _torch_noise(i).numpy())
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=ATOL, err_msg=f"step {i} (t={t})")
    x = want


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_small_log", "fixed_large", "learned_range"])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_ddpm_scheduler_steps(variance, prediction):
  ref = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type=variance, prediction_type=prediction)
  ref.set_timesteps(25)
  diffusion = _diffusion({"epsilon": "eps", "sample": "x0", "v_prediction": "v"}[prediction], variance)
  settings = samplers.SamplerSettings(method="ddpm", clip_range=1.0)
  table = schedules.step_table(diffusion.schedule, "ddim25")
  rng = np.random.default_rng(1)
  x = rng.standard_normal(SHAPE).astype(np.float32)
  for i, t in enumerate(ref.timesteps.tolist()):
    out = _model_output(rng, variance == "learned_range")
    want = ref.step(torch.from_numpy(out), t, torch.from_numpy(x),
                    generator=torch.Generator().manual_seed(i)).prev_sample.numpy()
    got = _ours(diffusion, settings, table, i, out, x, _torch_noise(i).numpy())
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=ATOL, err_msg=f"step {i} (t={t})")
    x = want


def test_ddpm_dynamic_thresholding():
  # 4-D arrays (diffusers' thresholding needs them); the update is elementwise and the percentile is taken
  # over all of an example's values, so NCHW vs NHWC order does not matter here.
  shape = (2, 3, 4, 4)
  ref = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample", thresholding=True,
                      dynamic_thresholding_ratio=0.9, sample_max_value=3.0)
  ref.set_timesteps(10)
  diffusion = _diffusion("x0", "fixed_small")
  settings = samplers.SamplerSettings(method="ddpm", dynamic_threshold=0.9, threshold_max=3.0)
  table = schedules.step_table(diffusion.schedule, "ddim10")
  rng = np.random.default_rng(2)
  x = rng.standard_normal(shape).astype(np.float32)
  for i, t in enumerate(ref.timesteps.tolist()):
    out = 4.0 * rng.standard_normal(shape).astype(np.float32)
    want = ref.step(torch.from_numpy(out), t, torch.from_numpy(x),
                    generator=torch.Generator().manual_seed(i)).prev_sample.numpy()
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(i)).numpy()
    got = _ours(diffusion, settings, table, i, out, x, noise)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=ATOL, err_msg=f"step {i} (t={t})")
    x = want


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("recompute_eps", [False, True])
def test_ddim_scheduler_steps(eta, prediction, recompute_eps):
  ref = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction, clip_sample=True)
  ref.set_timesteps(25)
  diffusion = _diffusion({"epsilon": "eps", "sample": "x0", "v_prediction": "v"}[prediction], "fixed_small")
  settings = samplers.SamplerSettings(method="ddim", eta=eta, clip_range=1.0, recompute_eps=recompute_eps)
  table = schedules.step_table(diffusion.schedule, "ddim25")
  rng = np.random.default_rng(3)
  x = rng.standard_normal(SHAPE).astype(np.float32)
  for i, t in enumerate(ref.timesteps.tolist()):
    out = _model_output(rng, False)
    noise = _torch_noise(i)
    want = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), eta=eta,
                    use_clipped_model_output=recompute_eps, variance_noise=noise if eta > 0 else None
                    ).prev_sample.numpy()
    got = _ours(diffusion, settings, table, i, out, x, noise.numpy())
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=ATOL, err_msg=f"step {i} (t={t})")
    x = want
