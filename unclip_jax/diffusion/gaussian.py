"""Gaussian diffusion: forward process, parameterisations, posterior, variances and training losses.

All functions are pure and work on any array shape [B, ...]; per-example scalars (ᾱ_t, β_t, ...) are
broadcast over the trailing axes. `GaussianDiffusion` binds a schedule and the model's semantics
(what it predicts, how its variance is defined, which loss trains it).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion.schedules import NoiseSchedule

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "learned_range")
LOSSES = ("mse", "hybrid")
LOSS_WEIGHTINGS = ("uniform", "min_snr")


def bcast(a: jax.Array, like: jax.Array) -> jax.Array:
  """[B] (or scalar) -> [B, 1, ..., 1] matching `like`'s rank."""
  a = jnp.asarray(a, jnp.float32)
  return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


def q_sample(x0: jax.Array, noise: jax.Array, alpha_bar: jax.Array) -> jax.Array:
  """x_t = √ᾱ·x0 + √(1-ᾱ)·ε.  x0, noise: [B, ...]; alpha_bar: [B] or scalar."""
  a = bcast(alpha_bar, x0)
  return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise


def x0_from_eps(x_t, eps, alpha_bar):
  a = bcast(alpha_bar, x_t)
  return (x_t - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)


def eps_from_x0(x_t, x0, alpha_bar):
  a = bcast(alpha_bar, x_t)
  return (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)


def x0_from_v(x_t, v, alpha_bar):
  a = bcast(alpha_bar, x_t)
  return jnp.sqrt(a) * x_t - jnp.sqrt(1.0 - a) * v


def v_target(x0, noise, alpha_bar):
  """v = √ᾱ·ε - √(1-ᾱ)·x0 (Salimans & Ho 2022)."""
  a = bcast(alpha_bar, x0)
  return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0


def predict_x0_eps(prediction: str, model_out, x_t, alpha_bar):
  """(x̂0, ε̂) from the mean part of a model output under parameterisation `prediction`."""
  if prediction == "eps":
    return x0_from_eps(x_t, model_out, alpha_bar), model_out
  if prediction == "x0":
    return model_out, eps_from_x0(x_t, model_out, alpha_bar)
  if prediction == "v":
    x0 = x0_from_v(x_t, model_out, alpha_bar)
    return x0, eps_from_x0(x_t, x0, alpha_bar)
  raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def posterior_mean(x0, x_t, alpha_bar, alpha_bar_prev, beta):
  """Mean of q(x_prev | x_t, x0) for a (possibly respaced) jump with effective β."""
  a, a_prev, b = bcast(alpha_bar, x_t), bcast(alpha_bar_prev, x_t), bcast(beta, x_t)
  coef_x0 = jnp.sqrt(a_prev) * b / (1.0 - a)
  coef_xt = jnp.sqrt(1.0 - b) * (1.0 - a_prev) / (1.0 - a)
  return coef_x0 * x0 + coef_xt * x_t


def posterior_variance(alpha_bar, alpha_bar_prev, beta):
  """σ̃² = (1-ᾱ_prev)/(1-ᾱ_t)·β (zero on the final jump to ᾱ_prev = 1)."""
  return (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * beta


def model_log_variance(variance: str, alpha_bar, alpha_bar_prev, beta, v=None, *, min_log_variance=None):
  """log σ² of p(x_prev | x_t) per variance type.

  Args:
    variance: one of VARIANCES.
    v: [B, ...] the model's variance channels in [-1, 1] (learned_range only).
    min_log_variance: lower end of the learned range; defaults to log(max(σ̃², 1e-20)) (diffusers). Training
      passes GLIDE's clipped posterior log variance.
  Returns:
    log σ², [B] for fixed variances or v's shape for learned_range.
  """
  post = posterior_variance(alpha_bar, alpha_bar_prev, beta)
  if variance in ("fixed_small", "fixed_small_log"):
    return jnp.log(jnp.maximum(post, 1e-20))
  if variance == "fixed_large":
    return jnp.log(beta)
  if variance == "learned_range":
    if v is None:
      raise ValueError("variance 'learned_range' needs the model's variance channels")
    min_log = jnp.log(jnp.maximum(post, 1e-20)) if min_log_variance is None else min_log_variance
    frac = (v + 1.0) / 2.0
    return frac * bcast(jnp.log(beta), v) + (1.0 - frac) * bcast(min_log, v)
  raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}")


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
  """log p(x) of 8-bit data in [-1, 1] under a Gaussian discretised to bins of width 2/255 (edges open)."""
  centered = x - mean
  inv_std = jnp.exp(-log_scale)
  cdf_plus = jax.scipy.special.ndtr(inv_std * (centered + 1.0 / 255.0))
  cdf_minus = jax.scipy.special.ndtr(inv_std * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_minus = jnp.log(jnp.maximum(1.0 - cdf_minus, 1e-12))
  log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_minus, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_minus, log_delta))


def _mean_flat(x):
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianDiffusion:
  """A noise schedule plus the model's semantics.

  Attributes:
    schedule: training tables (host numpy).
    prediction: what the mean channels of the model output are: "eps", "x0" or "v".
    variance: "fixed_small", "fixed_small_log" (same σ², diffusers' name), "fixed_large" or "learned_range"
      (the model outputs 2C channels, [mean part ; v in [-1, 1]]).
    loss: "mse" (simple loss on the prediction target) or "hybrid" (mse + vlb_weight·T·L_t in bits/dim, the
      improved-DDPM/GLIDE objective for learned variances; the VLB term trains the variance only).
    loss_weighting: "uniform" (every timestep's MSE weighs 1) or "min_snr" (Hang et al. 2023: the MSE of timestep
      t weighs as min(SNR_t, γ)·‖x0 − x̂0‖², i.e. min(SNR, γ)/SNR for ε, min(SNR, γ) for x0, min(SNR, γ)/(SNR + 1)
      for v; γ = min_snr_gamma).
  """
  schedule: NoiseSchedule
  prediction: str = "eps"
  variance: str = "fixed_small"
  loss: str = "mse"
  vlb_weight: float = 0.001
  loss_weighting: str = "uniform"
  min_snr_gamma: float = 5.0

  def __post_init__(self):
    if self.prediction not in PREDICTIONS:
      raise ValueError(f"unknown prediction {self.prediction!r}; choose one of {PREDICTIONS}")
    if self.variance not in VARIANCES:
      raise ValueError(f"unknown variance {self.variance!r}; choose one of {VARIANCES}")
    if self.loss not in LOSSES:
      raise ValueError(f"unknown loss {self.loss!r}; choose one of {LOSSES}")
    if self.loss == "hybrid" and self.variance != "learned_range":
      raise ValueError("loss 'hybrid' trains a learned variance: it needs variance='learned_range'")
    if self.loss_weighting not in LOSS_WEIGHTINGS:
      raise ValueError(f"unknown loss_weighting {self.loss_weighting!r}; choose one of {LOSS_WEIGHTINGS}")
    if not self.min_snr_gamma > 0:
      raise ValueError(f"min_snr_gamma must be > 0, got {self.min_snr_gamma}")

  @classmethod
  def from_config(cls, cfg) -> "GaussianDiffusion":
    """From a `config_lib.diffusion_config()` block."""
    return cls(NoiseSchedule.from_config(cfg), prediction=cfg.prediction, variance=cfg.variance, loss=cfg.loss,
               vlb_weight=cfg.vlb_weight, loss_weighting=cfg.loss_weighting,
               min_snr_gamma=float(cfg.min_snr_gamma))

  @property
  def num_timesteps(self) -> int:
    return self.schedule.num_timesteps

  @property
  def learned_variance(self) -> bool:
    return self.variance == "learned_range"

  def output_channels(self, data_channels: int) -> int:
    """Channels the network must output for data with `data_channels` channels."""
    return 2 * data_channels if self.learned_variance else data_channels

  def split_output(self, model_out: jax.Array, data_channels: int):
    """model output [..., C or 2C] -> (mean part [..., C], variance part [..., C] or None)."""
    expected = self.output_channels(data_channels)
    if model_out.shape[-1] != expected:
      raise ValueError(f"model output has {model_out.shape[-1]} channels; variance {self.variance!r} with "
                       f"{data_channels} data channels needs {expected}")
    if self.learned_variance:
      return model_out[..., :data_channels], model_out[..., data_channels:]
    return model_out, None

  # ---- tables as device arrays (computed from the schedule, traced as constants) ----------------------------
  def _alpha_bar(self, t):
    return jnp.asarray(self.schedule.alphas_cumprod)[t]

  def _alpha_bar_prev(self, t):
    table = np.concatenate([[1.0], self.schedule.alphas_cumprod[:-1]]).astype(np.float32)
    return jnp.asarray(table)[t]

  def _beta(self, t):
    return jnp.asarray(self.schedule.betas)[t]

  def _clipped_posterior_log_variance(self, t):
    """GLIDE's log σ̃² with the t=0 entry (σ̃²=0) replaced by the t=1 one."""
    s = self.schedule
    prev = np.concatenate([[1.0], s.alphas_cumprod[:-1]])
    post = (1.0 - prev) / (1.0 - s.alphas_cumprod) * s.betas
    post = np.concatenate([post[1:2], post[1:]]) if len(post) > 1 else np.maximum(post, 1e-20)
    return jnp.asarray(np.log(post).astype(np.float32))[t]

  # ---- training ----------------------------------------------------------------------------------------------
  def sample_timesteps(self, rng: jax.Array, batch: int) -> jax.Array:
    """Uniform t ~ U{0..T-1}, [batch] int32."""
    return jax.random.randint(rng, (batch,), 0, self.num_timesteps, dtype=jnp.int32)

  def q_sample(self, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Noised data at training timesteps t [B]."""
    _check_same_shape(x0, noise, "x0", "noise")
    return q_sample(x0, noise, self._alpha_bar(t))

  def target(self, x0, t, noise):
    """The regression target of the mean channels for this parameterisation."""
    if self.prediction == "eps":
      return noise
    if self.prediction == "x0":
      return x0
    return v_target(x0, noise, self._alpha_bar(t))

  def mse_weight(self, t: jax.Array) -> jax.Array:
    """Per-example weight [B] of the MSE term at timesteps t [B] (1 for "uniform"; see `loss_weighting`)."""
    if self.loss_weighting == "uniform":
      return jnp.ones(t.shape, jnp.float32)
    a = self._alpha_bar(t).astype(jnp.float32)
    snr = a / jnp.maximum(1.0 - a, 1e-12)
    if self.prediction == "eps":
      return jnp.minimum(1.0, self.min_snr_gamma / snr)   # = min(SNR, γ)/SNR, and 1 at SNR = 0
    clipped = jnp.minimum(snr, self.min_snr_gamma)
    return clipped if self.prediction == "x0" else clipped / (snr + 1.0)

  def loss_terms(self, model_out: jax.Array, x0: jax.Array, x_t: jax.Array, t: jax.Array,
                 noise: jax.Array) -> dict[str, jax.Array]:
    """Per-example loss terms, each [B]: 'mse' (unweighted), 'loss', and for the hybrid loss 'vb' (bits/dim).

    'loss' = mse_weight(t)·mse (+ vlb_weight·T·vb for the hybrid loss).

    Args:
      model_out: [B, ..., C or 2C] network output at (x_t, t).
      x0, x_t, noise: [B, ..., C]; t: [B] int training timesteps.
    """
    _check_same_shape(x0, x_t, "x0", "x_t")
    _check_same_shape(x0, noise, "x0", "noise")
    mean_out, v = self.split_output(model_out, x0.shape[-1])
    terms = {"mse": _mean_flat((self.target(x0, t, noise) - mean_out) ** 2)}
    weighted = self.mse_weight(t) * terms["mse"]
    if self.loss == "mse":
      terms["loss"] = weighted
      return terms
    # VLB term with a stop-gradient on the mean: it trains only the variance (improved DDPM §3.1).
    a, a_prev, beta = self._alpha_bar(t), self._alpha_bar_prev(t), self._beta(t)
    x0_hat, _ = predict_x0_eps(self.prediction, jax.lax.stop_gradient(mean_out), x_t, a)
    model_mean = posterior_mean(x0_hat, x_t, a, a_prev, beta)
    model_logvar = model_log_variance(self.variance, a, a_prev, beta, v,
                                      min_log_variance=self._clipped_posterior_log_variance(t))
    true_mean = posterior_mean(x0, x_t, a, a_prev, beta)
    true_logvar = self._clipped_posterior_log_variance(t)
    kl = _mean_flat(normal_kl(true_mean, bcast(true_logvar, x0), model_mean, model_logvar)) / math.log(2.0)
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)) / math.log(2.0)
    terms["vb"] = jnp.where(t == 0, nll, kl)
    terms["loss"] = weighted + self.vlb_weight * self.num_timesteps * terms["vb"]
    return terms


def _check_same_shape(a, b, name_a, name_b):
  if a.shape != b.shape:
    raise ValueError(f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}")
