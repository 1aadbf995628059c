"""Sampler behaviour: exact Gaussian denoiser statistics, DDIM inversion, scan == Python loop, progress, errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.diffusion import gaussian, samplers, schedules

MU, SIGMA = 1.0, 0.5
N, D = 8192, 2


def _optimal_model(diffusion: gaussian.GaussianDiffusion):
  """The exact E[x0 | x_t] for data N(MU, SIGMA²), returned in the diffusion's parameterisation."""
  alphas_cumprod = jnp.asarray(diffusion.schedule.alphas_cumprod)

  def model_fn(x, t):
    a = alphas_cumprod[t].reshape(-1, *([1] * (x.ndim - 1)))
    x0 = MU + jnp.sqrt(a) * SIGMA ** 2 / (a * SIGMA ** 2 + 1.0 - a) * (x - jnp.sqrt(a) * MU)
    if diffusion.prediction == "x0":
      return x0
    eps = gaussian.eps_from_x0(x, x0, a[..., 0] if x.ndim > 1 else a)
    if diffusion.prediction == "eps":
      return eps
    return jnp.sqrt(a) * eps - jnp.sqrt(1.0 - a) * x0
  return model_fn


def _diffusion(prediction="eps", variance="fixed_small"):
  return gaussian.GaussianDiffusion(schedules.NoiseSchedule.create("cosine", 1000), prediction=prediction,
                                    variance=variance)


# Ancestral sampling with the fixed-small variance only becomes exact as steps -> T (with 100 steps σ comes out
# ~3% low), so the stochastic samplers run all 1000 steps; deterministic DDIM is accurate with 100.
@pytest.mark.parametrize("method,eta,prediction,variance,steps", [
    ("ddpm", 0.0, "eps", "fixed_small", "1000"),
    ("ddpm", 0.0, "x0", "fixed_small", "1000"),
    ("ddpm", 0.0, "eps", "fixed_large", "1000"),
    ("ddim", 1.0, "v", "fixed_small", "1000"),
    ("ddim", 0.0, "eps", "fixed_small", "100"),
    ("ddim", 0.0, "x0", "fixed_small", "100"),
])
def test_optimal_denoiser_reproduces_gaussian(method, eta, prediction, variance, steps):
  diffusion = _diffusion(prediction, variance)
  settings = samplers.SamplerSettings(method=method, eta=eta, clip_range=None)
  x_T = jax.random.normal(jax.random.key(0), (N, D))
  run = jax.jit(functools.partial(samplers.sample, _optimal_model(diffusion), diffusion=diffusion, steps=steps,
                                  settings=settings))
  x0 = np.asarray(run(x_T, jax.random.key(1)))
  assert abs(x0.mean() / MU - 1.0) < 0.03, x0.mean()
  assert abs(x0.std() / SIGMA - 1.0) < 0.03, x0.std()


@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_ddim_inversion_reconstructs_input(prediction):
  diffusion = _diffusion(prediction)
  model = _optimal_model(diffusion)
  x0 = MU + SIGMA * jax.random.normal(jax.random.key(2), (256, D))
  invert = functools.partial(samplers.ddim_invert, model, diffusion=diffusion, steps="100", fixed_point_iters=2)
  x_T = jax.jit(invert)(x0)
  # The inverted latent is (close to) Gaussian noise, not the data.
  assert abs(float(jnp.mean(x_T))) < 0.15 and abs(float(jnp.std(x_T)) - 1.0) < 0.1
  settings = samplers.SamplerSettings(method="ddim", eta=0.0, clip_range=None)
  back = jax.jit(functools.partial(samplers.sample, model, diffusion=diffusion, steps="100",
                                   settings=settings))(x_T, jax.random.key(3))
  np.testing.assert_allclose(np.asarray(back), np.asarray(x0), atol=1e-3)


def test_plain_ddim_inversion_error_shrinks_with_steps():
  diffusion = _diffusion("eps")
  model = _optimal_model(diffusion)
  x0 = MU + SIGMA * jax.random.normal(jax.random.key(2), (256, D))
  settings = samplers.SamplerSettings(method="ddim", eta=0.0, clip_range=None)
  errors = []
  for steps in ("50", "200"):
    x_T = samplers.ddim_invert(model, x0, diffusion=diffusion, steps=steps)
    back = samplers.sample(model, x_T, jax.random.key(3), diffusion=diffusion, steps=steps, settings=settings)
    errors.append(float(jnp.max(jnp.abs(back - x0))))
  assert errors[1] < errors[0] / 2 and errors[1] < 0.02, errors


def _toy_conditional_model(data_channels, learned_variance):
  """A nonlinear model whose output depends on x, t and a [2B] conditioning vector bound as [uncond; cond]."""
  w = jax.random.normal(jax.random.key(7), (data_channels, data_channels)) * 0.3
  out_channels = 2 * data_channels if learned_variance else data_channels

  def model_fn(cond, x, t):
    h = jnp.tanh(x @ w + cond[:, None, :] + t[:, None, None] / 1000.0)
    return jnp.concatenate([h, jnp.tanh(h)], axis=-1)[..., :out_channels]
  return model_fn


@pytest.mark.parametrize("method,variance,guidance", [("ddpm", "learned_range", 3.0), ("ddim", "fixed_small", 1.0),
                                                     ("ddpm", "fixed_small", 1.0)])
def test_scan_equals_python_loop(method, variance, guidance):
  diffusion = _diffusion("eps", variance)
  settings = samplers.SamplerSettings(method=method, eta=0.5, guidance_scale=guidance, clip_range=1.0)
  batch = 3
  x_T = jax.random.normal(jax.random.key(4), (batch, 5, 4))
  rows = 2 * batch if guidance != 1.0 else batch
  cond = jax.random.normal(jax.random.key(5), (rows, 4))
  model = functools.partial(_toy_conditional_model(4, variance == "learned_range"), cond)
  rng = jax.random.key(6)
  scanned = jax.jit(functools.partial(samplers.sample, model, diffusion=diffusion, steps="10,5,3",
                                      settings=settings))(x_T, rng)
  looped = samplers.sample_python_loop(model, x_T, rng, diffusion=diffusion, steps="10,5,3", settings=settings)
  np.testing.assert_allclose(np.asarray(scanned), np.asarray(looped), atol=1e-5)


def test_guidance_scale_one_equals_unguided_and_scale_changes_result():
  diffusion = _diffusion("eps", "learned_range")
  x_T = jax.random.normal(jax.random.key(4), (2, 3, 4))
  cond = jax.random.normal(jax.random.key(5), (4, 4))
  toy = _toy_conditional_model(4, True)
  rng = jax.random.key(0)
  run = lambda model, scale: samplers.sample(model, x_T, rng, diffusion=diffusion, steps="5",
                                              settings=samplers.SamplerSettings(guidance_scale=scale))
  cond_only = run(functools.partial(toy, cond[2:]), 1.0)
  guided_one = run(functools.partial(toy, cond), 1.0 + 1e-9)  # guided path with scale ~1 -> cond result
  guided_big = run(functools.partial(toy, cond), 4.0)
  np.testing.assert_allclose(np.asarray(guided_one), np.asarray(cond_only), atol=1e-5)
  assert float(jnp.max(jnp.abs(guided_big - cond_only))) > 1e-2


def test_progress_callback_does_not_change_results():
  diffusion = _diffusion("eps")
  model = _optimal_model(diffusion)
  x_T = jax.random.normal(jax.random.key(0), (8, D))
  settings = samplers.SamplerSettings(method="ddpm", clip_range=None)
  bar = samplers.ProgressBar(total=12, disable=True)
  with_bar = samplers.make_sampler(lambda v, x, t, c: model(x, t), diffusion=diffusion, steps="12",
                                   settings=settings, progress=bar)
  without = samplers.make_sampler(lambda v, x, t, c: model(x, t), diffusion=diffusion, steps="12",
                                  settings=settings)
  a = with_bar({}, None, x_T, jax.random.key(1))
  a = with_bar({}, None, x_T, jax.random.key(1))      # second call reuses the compiled program
  b = without({}, None, x_T, jax.random.key(1))
  jax.effects_barrier()
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert bar.steps_seen == 24


def test_step_noise_is_fold_in_of_step_index():
  rng = jax.random.key(3)
  a = samplers.step_noise(rng, 4, (2, 3), jnp.float32)
  b = jax.random.normal(jax.random.fold_in(rng, 4), (2, 3))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_unknown_schedule_name():
  with pytest.raises(ValueError, match="unknown noise schedule 'cosin'"):
    schedules.NoiseSchedule.create("cosin", 1000)


@pytest.mark.parametrize("spec,match", [("0", "must be positive"), ("", "non-empty"), ("ddim0", "must be positive"),
                                        ("1001", "exceed the 1000 training steps"), ("ten", "not an integer"),
                                        ("ddim999", "no integer stride"), ("600,300", "spans only 500")])
def test_bad_step_specs(spec, match):
  with pytest.raises(ValueError, match=match):
    schedules.respace(spec, 1000)


def test_bad_sampler_settings():
  with pytest.raises(ValueError, match="unknown sampler method 'plms'"):
    samplers.SamplerSettings(method="plms")
  with pytest.raises(ValueError, match="dynamic_threshold"):
    samplers.SamplerSettings(dynamic_threshold=1.5)
  with pytest.raises(ValueError, match="unknown prediction 'epsilon'"):
    gaussian.GaussianDiffusion(schedules.NoiseSchedule.create(), prediction="epsilon")
  with pytest.raises(ValueError, match="needs variance='learned_range'"):
    gaussian.GaussianDiffusion(schedules.NoiseSchedule.create(), loss="hybrid")


def test_mismatched_shapes():
  diffusion = _diffusion("eps", "learned_range")
  x = jnp.zeros((2, 4, 3))
  with pytest.raises(ValueError, match="x0 has shape .* but noise has shape"):
    diffusion.q_sample(x, jnp.zeros((2,), jnp.int32), jnp.zeros((2, 4, 4)))
  with pytest.raises(ValueError, match="model output has 3 channels; variance 'learned_range' with 3 data"):
    samplers.sample(lambda x, t: x, jax.random.normal(jax.random.key(0), (2, 4, 3)), jax.random.key(0),
                    diffusion=diffusion, steps="3")


def test_sampler_with_sharded_latents_matches_single_device():
  devices = np.array(jax.devices()[:8])
  assert devices.size == 8, "conftest forces 8 CPU devices"
  mesh = jax.sharding.Mesh(devices.reshape(4, 2), ("data", "fsdp"),
                           axis_types=(jax.sharding.AxisType.Auto,) * 2)
  latent_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  diffusion = _diffusion("eps", "learned_range")
  settings = samplers.SamplerSettings(method="ddpm", guidance_scale=2.0)
  x_T = jax.random.normal(jax.random.key(4), (8, 5, 4))
  cond = jax.random.normal(jax.random.key(5), (16, 4))
  model = _toy_conditional_model(4, True)
  apply = lambda variables, x, t, c: model(c, x, t)
  single = samplers.make_sampler(apply, diffusion=diffusion, steps="6", settings=settings)({}, cond, x_T,
                                                                                          jax.random.key(1))
  with jax.set_mesh(mesh):
    sharded_run = samplers.make_sampler(apply, diffusion=diffusion, steps="6", settings=settings,
                                        sharding=latent_sharding)
    out = sharded_run({}, jax.device_put(cond, latent_sharding), jax.device_put(x_T, latent_sharding),
                      jax.random.key(1))
  assert out.sharding.is_equivalent_to(latent_sharding, out.ndim)
  np.testing.assert_allclose(np.asarray(out), np.asarray(single), atol=1e-5)


def test_text_guidance_three_branches():
  """u + s(i − u) + s_text(c − i): plain guidance (bit for bit) when s_text = s, the image branch alone when
  s_text = 0, variance from the cond rows; the sampler calls the model on [x; x; x]."""
  k = jax.random.split(jax.random.key(0), 3)
  u, i, c = (jax.random.normal(kk, (2, 4, 4, 6)) for kk in k)
  out = jnp.concatenate([u, i, c])
  plain = samplers.guide(jnp.concatenate([u, c]), 3.0, 3, True)
  np.testing.assert_array_equal(samplers.guide(out, 3.0, 3, True, text_scale=3.0), plain)   # the same arithmetic
  np.testing.assert_allclose(samplers.guide(out, 1.0, 3, True, text_scale=0.0)[..., :3], i[..., :3], atol=1e-6)
  np.testing.assert_array_equal(samplers.guide(out, 2.0, 3, True, text_scale=5.0)[..., 3:], c[..., 3:])
  want = u[..., :3] + 2.0 * (i[..., :3] - u[..., :3]) + 5.0 * (c[..., :3] - i[..., :3])
  np.testing.assert_allclose(samplers.guide(out, 2.0, 3, True, text_scale=5.0)[..., :3], want, atol=1e-5)
  np.testing.assert_allclose(samplers.guide(out[..., :3], 2.0, 3, False, text_scale=5.0), want, atol=1e-5)
  assert samplers.SamplerSettings().branches == 1 and samplers.SamplerSettings(guidance_scale=2.0).branches == 2
  assert samplers.SamplerSettings(text_guidance_scale=1.0).branches == 3
  seen = []

  def model_fn(x, t):
    seen.append(x.shape[0])
    return jnp.zeros_like(x)
  diffusion = gaussian.GaussianDiffusion(schedules.NoiseSchedule.create("cosine", 100), prediction="eps")
  samplers.sample(model_fn, jnp.zeros((2, 4, 4, 3)), jax.random.key(1), diffusion=diffusion, steps="2",
                  settings=samplers.SamplerSettings(guidance_scale=2.0, text_guidance_scale=4.0))
  assert set(seen) == {6}
