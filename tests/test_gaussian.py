"""Forward process, parameterisations, variances and training losses."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.diffusion import gaussian, schedules
from unclip_jax import config_lib

SCHED = schedules.NoiseSchedule.create("cosine", 1000)


def _data(shape=(4, 6, 6, 3), seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x0 = jnp.clip(jax.random.normal(k1, shape) * 0.5, -1, 1)
  noise = jax.random.normal(k2, shape)
  t = jax.random.randint(k3, (shape[0],), 0, 1000)
  return x0, noise, t


@pytest.mark.parametrize("prediction", gaussian.PREDICTIONS)
def test_parameterisations_invert_the_forward_process(prediction):
  diffusion = gaussian.GaussianDiffusion(SCHED, prediction=prediction)
  x0, noise, t = _data()
  t = jnp.clip(t, 1, 998)       # ᾱ at the very ends makes the inversion ill-conditioned in float32
  x_t = diffusion.q_sample(x0, t, noise)
  a = jnp.asarray(SCHED.alphas_cumprod)[t]
  got_x0, got_eps = gaussian.predict_x0_eps(prediction, diffusion.target(x0, t, noise), x_t, a)
  np.testing.assert_allclose(np.asarray(got_x0), np.asarray(x0), atol=2e-3)
  np.testing.assert_allclose(np.asarray(got_eps), np.asarray(noise), atol=2e-3)


def test_q_sample_marginal_statistics():
  diffusion = gaussian.GaussianDiffusion(SCHED)
  x0 = jnp.full((20000, 1), 0.8)
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  t = jnp.full((20000,), 500)
  x_t = np.asarray(diffusion.q_sample(x0, t, noise))
  a = SCHED.alphas_cumprod[500]
  assert abs(x_t.mean() - math.sqrt(a) * 0.8) < 0.02
  assert abs(x_t.std() - math.sqrt(1 - a)) < 0.02


def test_mse_loss_is_zero_for_the_true_target():
  diffusion = gaussian.GaussianDiffusion(SCHED, prediction="v")
  x0, noise, t = _data()
  x_t = diffusion.q_sample(x0, t, noise)
  terms = diffusion.loss_terms(diffusion.target(x0, t, noise), x0, x_t, t, noise)
  np.testing.assert_allclose(np.asarray(terms["loss"]), 0.0, atol=1e-10)
  assert terms["loss"].shape == (4,)


@pytest.mark.parametrize("prediction", gaussian.PREDICTIONS)
def test_min_snr_weighting_is_min_snr_gamma_times_the_x0_error(prediction):
  # Hang et al. 2023: whatever the network predicts, the weighted loss is min(SNR_t, γ)·‖x0 − x̂0‖².
  diffusion = gaussian.GaussianDiffusion(SCHED, prediction=prediction, loss_weighting="min_snr", min_snr_gamma=5.0)
  x0, noise, _ = _data()
  t = jnp.array([20, 300, 600, 950])       # SNR well above γ, near γ, below 1, far below
  x_t = diffusion.q_sample(x0, t, noise)
  out = diffusion.target(x0, t, noise) + 0.1 * jax.random.normal(jax.random.key(9), x0.shape)
  a = jnp.asarray(SCHED.alphas_cumprod)[t]
  x0_hat, _ = gaussian.predict_x0_eps(prediction, out, x_t, a)
  snr = np.asarray(a, np.float64) / (1 - np.asarray(a, np.float64))
  want = np.minimum(snr, 5.0) * np.mean((np.asarray(x0_hat) - np.asarray(x0)) ** 2, axis=(1, 2, 3))
  terms = diffusion.loss_terms(out, x0, x_t, t, noise)
  np.testing.assert_allclose(np.asarray(terms["loss"]), want, rtol=2e-3)
  uniform = gaussian.GaussianDiffusion(SCHED, prediction=prediction).loss_terms(out, x0, x_t, t, noise)
  np.testing.assert_allclose(np.asarray(terms["mse"]), np.asarray(uniform["mse"]))   # 'mse' stays unweighted
  np.testing.assert_array_equal(np.asarray(uniform["loss"]), np.asarray(uniform["mse"]))
  w = np.asarray(diffusion.mse_weight(jnp.arange(1000)))
  assert np.isfinite(w).all() and (w >= 0).all()


def test_min_snr_weighting_adds_to_the_hybrid_vlb_and_is_read_from_the_config():
  cfg = config_lib.diffusion_config(prediction="v", variance="learned_range", loss="hybrid",
                                    loss_weighting="min_snr")
  diffusion = gaussian.GaussianDiffusion.from_config(cfg)
  assert diffusion.loss_weighting == "min_snr" and diffusion.min_snr_gamma == 5.0
  x0, noise, t = _data()
  x_t = diffusion.q_sample(x0, t, noise)
  out = jnp.concatenate([diffusion.target(x0, t, noise) + 0.1, jnp.zeros_like(x0)], -1)
  terms = diffusion.loss_terms(out, x0, x_t, t, noise)
  np.testing.assert_allclose(np.asarray(terms["loss"]), np.asarray(diffusion.mse_weight(t) * terms["mse"]
                                                                   + 1.0 * terms["vb"]), rtol=1e-5)
  old = config_lib.to_dict(config_lib.load_config("decoder:tiny"))                     # a config saved before
  del old["diffusion"]["loss_weighting"], old["diffusion"]["min_snr_gamma"]            # the weighting existed
  assert gaussian.GaussianDiffusion.from_config(config_lib.complete(old).diffusion).loss_weighting == "uniform"
  with pytest.raises(ValueError, match="loss_weighting"):
    gaussian.GaussianDiffusion(SCHED, loss_weighting="min-snr")
  with pytest.raises(ValueError, match="min_snr_gamma"):
    gaussian.GaussianDiffusion(SCHED, loss_weighting="min_snr", min_snr_gamma=0.0)


def test_hybrid_vlb_vanishes_for_the_true_posterior_and_trains_only_the_variance():
  diffusion = gaussian.GaussianDiffusion(SCHED, prediction="eps", variance="learned_range", loss="hybrid")
  x0, noise, t = _data()
  t = jnp.array([3, 100, 500, 900])
  x_t = diffusion.q_sample(x0, t, noise)
  # v = -1 selects the lower end of the learned range = the (clipped) true posterior log variance.
  out = jnp.concatenate([noise, -jnp.ones_like(noise)], axis=-1)
  terms = diffusion.loss_terms(out, x0, x_t, t, noise)
  np.testing.assert_allclose(np.asarray(terms["vb"]), 0.0, atol=1e-4)
  # A wrong variance costs bits; the VLB gradient reaches only the variance channels.
  out_bad = jnp.concatenate([noise, jnp.ones_like(noise)], axis=-1)
  # (at large t the learned range [σ̃², β] is narrow, so the cost of the wrong end shrinks there)
  bad_vb = np.asarray(diffusion.loss_terms(out_bad, x0, x_t, t, noise)["vb"])
  assert bad_vb[0] > 1e-2 and np.all(bad_vb[:3] > 0) and np.all(np.diff(bad_vb) < 0), bad_vb
  grad = jax.grad(lambda o: jnp.sum(diffusion.loss_terms(o, x0, x_t, t, noise)["vb"]))(out_bad)
  assert float(jnp.max(jnp.abs(grad[..., :3]))) == 0.0
  assert float(jnp.max(jnp.abs(grad[..., 3:]))) > 0.0
  loss = diffusion.loss_terms(out_bad, x0, x_t, t, noise)
  np.testing.assert_allclose(np.asarray(loss["loss"]),
                             np.asarray(loss["mse"] + 0.001 * 1000 * loss["vb"]), rtol=1e-6)


def test_t0_term_is_the_discretised_decoder_nll():
  diffusion = gaussian.GaussianDiffusion(SCHED, prediction="eps", variance="learned_range", loss="hybrid")
  x0, noise, _ = _data()
  t = jnp.zeros((4,), jnp.int32)
  x_t = diffusion.q_sample(x0, t, noise)
  terms = diffusion.loss_terms(jnp.concatenate([noise, jnp.zeros_like(noise)], -1), x0, x_t, t, noise)
  # A near-perfect decoder at t=0 puts almost all mass in the right 8-bit bin: well under 1 bit per dim.
  assert float(jnp.max(terms["vb"])) < 1.0 and float(jnp.min(terms["vb"])) > 0.0


def test_discretised_likelihood_sums_to_one_over_all_bins():
  bins = jnp.linspace(-1.0, 1.0, 256)
  logp = gaussian.discretized_gaussian_log_likelihood(bins, jnp.full_like(bins, 0.1), jnp.full_like(bins, -2.0))
  np.testing.assert_allclose(float(jnp.sum(jnp.exp(logp))), 1.0, atol=1e-4)


def test_fixed_variances_match_their_definitions():
  a, a_prev, beta = jnp.float32(0.5), jnp.float32(0.6), jnp.float32(1 - 0.5 / 0.6)
  post = (1 - 0.6) / (1 - 0.5) * float(beta)
  np.testing.assert_allclose(float(gaussian.model_log_variance("fixed_small", a, a_prev, beta)), math.log(post),
                             rtol=1e-5)
  np.testing.assert_allclose(float(gaussian.model_log_variance("fixed_large", a, a_prev, beta)),
                             math.log(float(beta)), rtol=1e-5)
  v = jnp.zeros((2, 3))
  mid = gaussian.model_log_variance("learned_range", a, a_prev, beta, v)
  np.testing.assert_allclose(np.asarray(mid), 0.5 * (math.log(post) + math.log(float(beta))), rtol=1e-5)


def test_from_config_builds_every_stage():
  for stage in ("prior", "decoder", "upsampler"):
    cfg = config_lib.load_config(f"configs/{stage}.py:tiny")
    diffusion = gaussian.GaussianDiffusion.from_config(cfg.diffusion)
    assert diffusion.num_timesteps == cfg.diffusion.timesteps
  assert gaussian.GaussianDiffusion.from_config(config_lib.load_config("configs/decoder.py").diffusion
                                                ).output_channels(3) == 6


def test_linear_schedule_is_scaled_to_the_number_of_steps():
  betas = schedules.make_betas("linear", 100)
  np.testing.assert_allclose(betas[[0, -1]], [1e-3, 0.2])
