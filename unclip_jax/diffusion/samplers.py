"""DDPM and DDIM sampling, classifier-free guidance, DDIM inversion and inpainting (x̂0 pasting, RePaint), written
once for every stage.

A `model_fn(x [N, ..., C], t [N] int32) -> out [N, ..., C or 2C]` is called with the *training* timestep
indices of the visited steps. The update rules are pure functions of (x_t, model output, per-step scalars,
noise); `sample` drives them with one `lax.scan` over a static number of steps, drawing step i's noise from
`jax.random.fold_in(rng, i)`, so it jits into one program and a Python loop over `sampler_step` gives the
same result.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion import gaussian
from unclip_jax.diffusion.gaussian import GaussianDiffusion
from unclip_jax.diffusion.schedules import StepTable, step_table

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
METHODS = ("ddpm", "ddim")


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """How to sample.

  Attributes:
    method: "ddpm" (ancestral, variance from the diffusion's variance type) or "ddim".
    eta: DDIM stochasticity: 0 deterministic, 1 ≈ DDPM with the fixed-small variance.
    guidance_scale: classifier-free guidance scale; 1 disables guidance (and the doubled batch).
    text_guidance_scale: None, or a separate scale for a text branch: three branches [uncond; image; cond]
      (image = the conditioning without its text) guided as u + s·(i − u) + s_text·(c − i) (compositional
      guidance, Liu et al. 2022; InstructPix2Pix's two scales, Brooks et al. 2023). s_text = s is plain guidance.
    clip_range: clamp x̂0 to ±clip_range; None disables.
    dynamic_threshold: Imagen dynamic thresholding percentile in (0, 1); 0 disables (then clip_range applies).
    threshold_max: upper bound on the dynamic threshold s.
    recompute_eps: DDIM only: derive ε from the clipped x̂0 (GLIDE/ADM) instead of using the raw prediction
      (diffusers' default, `use_clipped_model_output=False`).
    single_step_beta: "ratio" or "schedule" (diffusers' UnCLIPScheduler); see `schedules.step_table`.
  """
  method: str = "ddpm"
  eta: float = 0.0
  guidance_scale: float = 1.0
  text_guidance_scale: float | None = None
  clip_range: float | None = 1.0
  dynamic_threshold: float = 0.0
  threshold_max: float = math.inf
  recompute_eps: bool = True
  single_step_beta: str = "ratio"

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"unknown sampler method {self.method!r}; choose one of {METHODS}")
    if not 0.0 <= self.eta:
      raise ValueError(f"eta must be >= 0, got {self.eta}")
    if not 0.0 <= self.dynamic_threshold < 1.0:
      raise ValueError(f"dynamic_threshold must be a percentile in [0, 1), got {self.dynamic_threshold}")
    if self.clip_range is not None and self.clip_range <= 0:
      raise ValueError(f"clip_range must be positive or None, got {self.clip_range}")

  @property
  def branches(self) -> int:
    """Rows per sample the model is called on: 1 (unguided), 2 ([uncond; cond]) or 3 ([uncond; image; cond])."""
    if self.text_guidance_scale is not None:
      return 3
    return 2 if self.guidance_scale != 1.0 else 1

  @classmethod
  def from_config(cls, cfg) -> "SamplerSettings":
    """From a `config_lib.sampling_config()` block."""
    return cls(method=cfg.sampler, eta=cfg.eta, guidance_scale=cfg.guidance_scale,
               clip_range=cfg.clip_range if cfg.clip_denoised else None, dynamic_threshold=cfg.dynamic_threshold,
               single_step_beta=cfg.single_step_beta)


# ---- pure pieces -------------------------------------------------------------------------------------------------
def threshold_x0(x0: jax.Array, settings: SamplerSettings) -> jax.Array:
  """Static clipping or dynamic thresholding of x̂0 [B, ...]."""
  if settings.dynamic_threshold > 0:
    flat = jnp.abs(x0.reshape(x0.shape[0], -1)).astype(jnp.float32)
    s = jnp.quantile(flat, settings.dynamic_threshold, axis=1)
    s = jnp.clip(s, 1.0, settings.threshold_max).reshape((-1,) + (1,) * (x0.ndim - 1))
    return (jnp.clip(x0, -s, s) / s).astype(x0.dtype)
  if settings.clip_range is not None:
    return jnp.clip(x0, -settings.clip_range, settings.clip_range)
  return x0


def guide(model_out: jax.Array, scale: float, data_channels: int, learned_variance: bool,
          text_scale: float | None = None) -> jax.Array:
  """Classifier-free guidance of a doubled-batch output [2B, ..., C or 2C] laid out [uncond; cond], or with
  `text_scale` of a tripled one [3B, ...] laid out [uncond; image; cond].

  The mean channels are guided, u + s·(c − u), or u + s·(i − u) + s_text·(c − i), computed as
  u + s·(c − u) + (s_text − s)·(c − i) so that s_text = s is plain guidance's arithmetic exactly;
  learned-variance channels are taken from the cond rows. Returns [B, ..., C or 2C].
  """
  mean = lambda o: o[..., :data_channels] if learned_variance else o
  if text_scale is None:
    uncond, cond = jnp.split(model_out, 2, axis=0)
  else:
    uncond, image, cond = jnp.split(model_out, 3, axis=0)
  guided_mean = mean(uncond) + scale * (mean(cond) - mean(uncond))
  if text_scale is not None:
    guided_mean = guided_mean + (text_scale - scale) * (mean(cond) - mean(image))
  if learned_variance:
    return jnp.concatenate([guided_mean, cond[..., data_channels:]], axis=-1)
  return guided_mean


def guided(model_fn: ModelFn, scale: float, data_channels: int, learned_variance: bool,
           text_scale: float | None = None) -> ModelFn:
  """Wraps a model_fn whose conditioning is bound as [uncond; cond] (or [uncond; image; cond] with `text_scale`)
  into a guided single-batch model_fn."""
  n = 2 if text_scale is None else 3

  def fn(x, t):
    out = model_fn(jnp.concatenate([x] * n, axis=0), jnp.concatenate([t] * n, axis=0))
    return guide(out, scale, data_channels, learned_variance, text_scale)
  return fn


def denoise(diffusion: GaussianDiffusion, settings: SamplerSettings, model_out, x_t, alpha_bar,
            denoised_fn: Callable[[jax.Array], jax.Array] | None = None):
  """Model output -> (x̂0 thresholded, ε̂ from the raw prediction, variance channels or None).

  `denoised_fn` (optional) maps x̂0 before the thresholding, as GLIDE's `denoised_fn` (e.g. `paste_known`).
  """
  mean_out, v = diffusion.split_output(model_out, x_t.shape[-1])
  x0, eps = gaussian.predict_x0_eps(diffusion.prediction, mean_out, x_t, alpha_bar)
  if denoised_fn is not None:
    x0 = denoised_fn(x0)
  return threshold_x0(x0, settings), eps, v


def ddpm_update(diffusion: GaussianDiffusion, x_t, x0, v, step: dict, noise):
  """One ancestral step x_t -> x_prev given x̂0; no noise is added at t = 0."""
  a, a_prev, beta = step["alpha_bar"], step["alpha_bar_prev"], step["beta"]
  mean = gaussian.posterior_mean(x0, x_t, a, a_prev, beta)
  log_var = gaussian.model_log_variance(diffusion.variance, a, a_prev, beta, v)
  std = gaussian.bcast(jnp.exp(0.5 * log_var), x_t) if jnp.ndim(log_var) < x_t.ndim else jnp.exp(0.5 * log_var)
  return jnp.where(step["t"] > 0, mean + std * noise, mean).astype(x_t.dtype)


def ddim_update(x_t, x0, eps, step: dict, noise, eta: float):
  """One DDIM step x_t -> x_prev (Song et al. 2021, eq. 12) with stochasticity η."""
  a, a_prev = step["alpha_bar"], step["alpha_bar_prev"]
  sigma = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev))
  direction = jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma ** 2, 0.0)) * eps
  x_prev = jnp.sqrt(a_prev) * x0 + direction
  if eta > 0:
    x_prev = x_prev + sigma * noise
  return x_prev.astype(x_t.dtype)


def step_noise(rng: jax.Array, index, shape, dtype) -> jax.Array:
  """The noise of sampling step `index`: N(0, 1) from fold_in(rng, index).

  rng: one key (the whole [B, ...] batch drawn at once), or a batch of per-row keys [B] (row b draws
  `normal(fold_in(rng[b], index), shape[1:])`, so a row's noise does not depend on the other rows).
  """
  if is_row_keys(rng):
    if rng.shape[0] != shape[0]:
      raise ValueError(f"per-row keys [{rng.shape[0]}] do not match the batch of noise shape {tuple(shape)}")
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, index), shape[1:], dtype))(rng)
  return jax.random.normal(jax.random.fold_in(rng, index), shape, dtype)


def is_row_keys(rng) -> bool:
  """A batch of typed keys [B] (per-row randomness), as opposed to one key (typed, or a legacy uint32 [2])."""
  return jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.ndim == 1


def row_normal(keys: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """Per-row initial noise: keys [B] -> [B, *shape], row b = normal(keys[b], shape)."""
  return jax.vmap(lambda k: jax.random.normal(k, tuple(shape), dtype))(keys)


def sampler_step(model_fn: ModelFn, x: jax.Array, step: dict, rng: jax.Array, *, diffusion: GaussianDiffusion,
                 settings: SamplerSettings,
                 denoised_fn: Callable[[jax.Array], jax.Array] | None = None) -> tuple[jax.Array, jax.Array]:
  """One reverse step. `step` holds scalars index, t, alpha_bar, alpha_bar_prev, beta (see StepTable).

  `model_fn` is the already-guided model (see `guided`); `denoised_fn` optionally maps x̂0 (see `denoise`).
  Returns (x_prev, x̂0).
  """
  t = jnp.full((x.shape[0],), step["t"], jnp.int32)
  x0, eps, v = denoise(diffusion, settings, model_fn(x, t), x, step["alpha_bar"], denoised_fn)
  noise = step_noise(rng, step["index"], x.shape, x.dtype)
  if settings.method == "ddpm":
    return ddpm_update(diffusion, x, x0, v, step, noise), x0
  if settings.recompute_eps:
    eps = gaussian.eps_from_x0(x, x0, step["alpha_bar"])
  return ddim_update(x, x0, eps, step, noise, settings.eta), x0


def _prepare(model_fn, x, diffusion, settings, steps) -> tuple[ModelFn, StepTable]:
  if x.ndim < 2:
    raise ValueError(f"x_T must be [B, ..., C], got shape {x.shape}")
  table = step_table(diffusion.schedule, steps, settings.single_step_beta)
  if settings.branches > 1:
    model_fn = guided(model_fn, settings.guidance_scale, x.shape[-1], diffusion.learned_variance,
                      settings.text_guidance_scale)
  return model_fn, table


def _end_of_step(x: jax.Array, step: dict, sharding, progress) -> jax.Array:
  """What every sampler does after a step: the latents' sharding constraint and the progress report."""
  if sharding is not None:
    x = jax.lax.with_sharding_constraint(x, sharding)
  if progress is not None:
    jax.debug.callback(progress, step["index"])
  return x


def _scan_inputs(table: StepTable) -> dict[str, jax.Array]:
  return {k: jnp.asarray(v) for k, v in table.as_scan_inputs().items()}


def sample(model_fn: ModelFn, x_T: jax.Array, rng: jax.Array, *, diffusion: GaussianDiffusion,
           steps: str | int = "25", settings: SamplerSettings = SamplerSettings(),
           progress: Callable[[Any], None] | None = None, sharding=None,
           denoised_fn: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """Runs the reverse process from x_T [B, ..., C] to x̂0 with one `lax.scan` (traceable; jit the caller).

  Args:
    model_fn: unguided model; with guidance_scale != 1 it is called on [x; x] and must return [uncond; cond].
    x_T: initial noise.
    rng: key for the per-step noise.
    steps: respacing spec ("25", "10,10,5", "ddim50"); static.
    progress: optional host callback called with the step index from inside the scan (see `ProgressBar`).
    sharding: optional sharding constraint applied to the latents after every step.
    denoised_fn: optional map of x̂0 [B, ..., C] applied every step before thresholding (see `paste_known`).
  """
  model_fn, table = _prepare(model_fn, x_T, diffusion, settings, steps)

  def body(x, step):
    x_prev, _ = sampler_step(model_fn, x, step, rng, diffusion=diffusion, settings=settings,
                             denoised_fn=denoised_fn)
    return _end_of_step(x_prev, step, sharding, progress), None

  x0, _ = jax.lax.scan(body, x_T, _scan_inputs(table))
  return x0


def sample_python_loop(model_fn: ModelFn, x_T: jax.Array, rng: jax.Array, *, diffusion: GaussianDiffusion,
                       steps: str | int = "25", settings: SamplerSettings = SamplerSettings(),
                       denoised_fn: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """`sample` as an eager Python loop over `sampler_step` (for debugging and for testing the scan)."""
  model_fn, table = _prepare(model_fn, x_T, diffusion, settings, steps)
  inputs, x = table.as_scan_inputs(), x_T
  for i in range(table.num_steps):
    step = {k: jnp.asarray(v[i]) for k, v in inputs.items()}
    x, _ = sampler_step(model_fn, x, step, rng, diffusion=diffusion, settings=settings, denoised_fn=denoised_fn)
  return x


# ---- inpainting ------------------------------------------------------------------------------------------------
def paste_known(known: jax.Array, mask: jax.Array) -> Callable[[jax.Array], jax.Array]:
  """A `denoised_fn` pasting the known pixels into x̂0: x̂0·(1-m) + known·m (GLIDE's inpainting notebook).

  known: [B, ..., C]; mask: broadcastable to it, 1 = known.
  """
  def fn(x0):
    m = mask.astype(x0.dtype)
    return x0 * (1.0 - m) + known.astype(x0.dtype) * m
  return fn


def renoise(x_prev: jax.Array, step: dict, noise: jax.Array) -> jax.Array:
  """The forward jump back over one sampling step, ᾱ_prev -> ᾱ_t: √(ᾱ_t/ᾱ_prev)·x_prev + √(1-ᾱ_t/ᾱ_prev)·ε."""
  ratio = step["alpha_bar"] / step["alpha_bar_prev"]
  return (jnp.sqrt(ratio) * x_prev + jnp.sqrt(1.0 - ratio) * noise).astype(x_prev.dtype)


def repaint_keys(rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """RePaint's three noise streams (reverse step, known-region q_sample, renoising), split from `rng`.

  Repetition j of sampling step i draws `step_noise(fold_in(stream, j), i, ...)` from each stream, so with
  `resample_jumps=1` and nothing known `repaint_sample(rng)` equals `sample(fold_in(repaint_keys(rng)[0], 0))`.
  """
  reverse_rng, known_rng, renoise_rng = jax.random.split(rng, 3)
  return reverse_rng, known_rng, renoise_rng


def repaint_sample(model_fn: ModelFn, x_T: jax.Array, rng: jax.Array, *, known: jax.Array, mask: jax.Array,
                   diffusion: GaussianDiffusion, steps: str | int = "25", settings: SamplerSettings = SamplerSettings(),
                   resample_jumps: int = 1, progress: Callable[[Any], None] | None = None, sharding=None,
                   denoised_fn: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """RePaint (Lugmayr et al. 2022) inpainting with an unconditional model, in one `lax.scan`.

  Each sampling step t -> t_prev is repeated `resample_jumps` (r) times: reverse step x_t -> x_prev; the known
  region of x_prev is replaced by q_sample(known, ᾱ_prev) with fresh noise, x_prev = m·known_prev + (1-m)·x_prev;
  except after the last repetition, x_prev is renoised one step back to x_t (`renoise`). The final step (to
  ᾱ_prev = 1) is not repeated, as in the paper, and pastes the known pixels exactly. Noise streams: `repaint_keys`.

  Args:
    model_fn, x_T, steps, settings, progress, sharding, denoised_fn: as in `sample`.
    known: [B, ..., C] the known image; mask: broadcastable to x_T, 1 = known pixel (soft values blend).
    resample_jumps: r >= 1 (static).
  Returns:
    x̂0 [B, ..., C].
  """
  if not isinstance(resample_jumps, (int, np.integer)) or resample_jumps < 1:
    raise ValueError(f"resample_jumps must be an integer >= 1, got {resample_jumps!r}")
  if known.shape != x_T.shape:
    raise ValueError(f"known image must have the latents' shape {x_T.shape}, got {known.shape}")
  try:
    np.broadcast_shapes(mask.shape, x_T.shape)
  except ValueError:
    raise ValueError(f"mask of shape {mask.shape} does not broadcast to the latents' shape {x_T.shape}") from None
  model_fn, table = _prepare(model_fn, x_T, diffusion, settings, steps)
  reverse_rng, known_rng, renoise_rng = repaint_keys(rng)
  m = jnp.asarray(mask).astype(x_T.dtype)
  known = known.astype(x_T.dtype)

  def body(x, step):
    last = step["alpha_bar_prev"] >= 1.0
    reps = jnp.where(last, 1, resample_jumps)

    def rep(j, carry):
      x_t, _ = carry
      x_prev, _ = sampler_step(model_fn, x_t, step, jax.random.fold_in(reverse_rng, j), diffusion=diffusion,
                               settings=settings, denoised_fn=denoised_fn)
      known_noise = step_noise(jax.random.fold_in(known_rng, j), step["index"], x.shape, x.dtype)
      known_prev = gaussian.q_sample(known, known_noise, step["alpha_bar_prev"]).astype(x.dtype)
      x_prev = m * known_prev + (1.0 - m) * x_prev
      noise = step_noise(jax.random.fold_in(renoise_rng, j), step["index"], x.shape, x.dtype)
      return renoise(x_prev, step, noise), x_prev

    _, x_prev = jax.lax.fori_loop(0, reps, rep, (x, x))
    return _end_of_step(x_prev, step, sharding, progress), None

  x0, _ = jax.lax.scan(body, x_T, _scan_inputs(table))
  return x0


def ddim_invert(model_fn: ModelFn, x0: jax.Array, *, diffusion: GaussianDiffusion, steps: str | int = "50",
                guidance_scale: float = 1.0, fixed_point_iters: int = 0,
                progress: Callable[[Any], None] | None = None) -> jax.Array:
  """Deterministic DDIM inversion: clean data x0 [B, ..., C] -> x_T that η=0 DDIM sampling maps back to x0.

  Visits the timesteps of `sample(steps=...)` in reverse (no clipping). Step k moves the latent from ᾱ_cur up
  to ᾱ_k along the DDIM ODE with ε̂ = model(x_k, t_k); the plain scheme evaluates the model at the current
  latent instead of the unknown x_k. `fixed_point_iters` > 0 re-evaluates ε̂ at the latest estimate of x_k
  that many times, so the step becomes the exact inverse of the sampler's step as the iteration converges.
  """
  if fixed_point_iters < 0:
    raise ValueError(f"fixed_point_iters must be >= 0, got {fixed_point_iters}")
  settings = SamplerSettings(method="ddim", guidance_scale=guidance_scale, clip_range=None)
  model_fn, table = _prepare(model_fn, x0, diffusion, settings, steps)
  inputs = {k: v[::-1] for k, v in _scan_inputs(table).items()}        # ascending t

  def body(x, step):
    t = jnp.full((x.shape[0],), step["t"], jnp.int32)
    a_cur, a_next = step["alpha_bar_prev"], step["alpha_bar"]

    def up(x_eval):
      mean_out, _ = diffusion.split_output(model_fn(x_eval, t), x.shape[-1])
      x0_m, eps_m = gaussian.predict_x0_eps(diffusion.prediction, mean_out, x_eval, a_next)
      # Invert x = √ᾱ_cur·x̂0 + √(1-ᾱ_cur)·ε̂ for whichever of x̂0, ε̂ is better conditioned at ᾱ_cur, then
      # move to ᾱ_next. Both forms are exact at the fixed point; dividing by a small √ᾱ_cur (near T) or
      # √(1-ᾱ_cur) (near 0) would amplify float32 rounding.
      x0_from_x = (x - jnp.sqrt(1.0 - a_cur) * eps_m) / jnp.sqrt(a_cur)
      eps_from_x = (x - jnp.sqrt(a_cur) * x0_m) / jnp.sqrt(jnp.maximum(1.0 - a_cur, 1e-20))
      x0_hat, eps = jnp.where(a_cur > 0.5, x0_from_x, x0_m), jnp.where(a_cur > 0.5, eps_m, eps_from_x)
      return (jnp.sqrt(a_next) * x0_hat + jnp.sqrt(1.0 - a_next) * eps).astype(x.dtype)

    x_next = jax.lax.fori_loop(0, fixed_point_iters, lambda _, guess: up(guess), up(x))
    if progress is not None:
      jax.debug.callback(progress, step["index"])
    return x_next, None

  x_T, _ = jax.lax.scan(body, x0, inputs)
  return x_T


def make_sampler(apply_fn: Callable[..., jax.Array], *, diffusion: GaussianDiffusion, steps: str | int,
                 settings: SamplerSettings, progress: Callable[[Any], None] | None = None,
                 sharding=None, donate_noise: bool = False):
  """A jitted `(variables, cond, x_T, rng) -> x̂0` for `apply_fn(variables, x, t, cond) -> out`.

  With guidance the caller binds `cond` as the [uncond; cond] batch of conditioning (2B rows).
  """
  def run(variables, cond, x_T, rng):
    return sample(lambda x, t: apply_fn(variables, x, t, cond), x_T, rng, diffusion=diffusion, steps=steps,
                  settings=settings, progress=progress, sharding=sharding)
  return jax.jit(run, donate_argnums=(2,) if donate_noise else ())


class ProgressBar:
  """A tqdm bar driven from inside a jitted scan: pass an instance as `progress=`.

  The callback only reads the step index, so it never changes results; a new bar opens whenever step 0
  is reported, so one jitted sampler can be called many times.
  """

  def __init__(self, total: int, desc: str = "sampling", disable: bool = False):
    self.total, self.desc, self.disable = total, desc, disable
    self._bar = None
    self.steps_seen = 0

  def __call__(self, index) -> None:
    from tqdm.auto import tqdm

    i = int(np.asarray(index))
    if i == 0 or self._bar is None:
      self.close()
      self._bar = tqdm(total=self.total, desc=self.desc, disable=self.disable, leave=False)
    self.steps_seen += 1
    self._bar.update(max(i + 1 - self._bar.n, 0))
    if i + 1 >= self.total:
      self.close()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
