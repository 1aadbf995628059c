"""Noise schedules and timestep respacing, computed from the config on the host (never stored in checkpoints).

Conventions: `T` training timesteps indexed 0..T-1; `alphas_cumprod[t]` = ᾱ_t = prod_{s<=t} (1 - β_s).
The cosine schedule ("squaredcos_cap_v2", Nichol & Dhariwal 2021) is evaluated in float64 and stored as float32;
ᾱ is the cumulative product of the float32 α taken in float64 and stored float32, which reproduces diffusers'
tables bit for bit.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

SCHEDULES = ("cosine", "squaredcos_cap_v2", "linear")


def cosine_alpha_bar(s: float) -> float:
  """ᾱ(s) for s in [0, 1]: cos²((s + 0.008) / 1.008 · π/2)."""
  return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def make_betas(schedule: str, num_timesteps: int, *, beta_start: float = 1e-4, beta_end: float = 0.02,
               max_beta: float = 0.999) -> np.ndarray:
  """β_0..β_{T-1} as float64.

  Args:
    schedule: "cosine" / "squaredcos_cap_v2", or "linear" (GLIDE/ADM: linspace(beta_start, beta_end) scaled
      by 1000/T so that any T has the same total noise as T=1000).
    num_timesteps: T > 0.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {SCHEDULES}")
  if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps <= 0:
    raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
  if schedule == "linear":
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)
  return np.array([min(1.0 - cosine_alpha_bar((i + 1) / num_timesteps) / cosine_alpha_bar(i / num_timesteps),
                       max_beta) for i in range(num_timesteps)], dtype=np.float64)


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
  """The training-time tables: `betas` [T] and `alphas_cumprod` [T], both float32 numpy arrays."""
  betas: np.ndarray
  alphas_cumprod: np.ndarray

  @classmethod
  def create(cls, schedule: str = "cosine", num_timesteps: int = 1000, **kwargs) -> "NoiseSchedule":
    betas = make_betas(schedule, num_timesteps, **kwargs).astype(np.float32)
    # float32 α, accumulated in float64 and stored float32 (what torch's CPU cumprod does).
    alphas_cumprod = np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32)
    return cls(betas=betas, alphas_cumprod=alphas_cumprod)

  @classmethod
  def from_config(cls, cfg) -> "NoiseSchedule":
    """From a `config_lib.diffusion_config()` block."""
    return cls.create(cfg.schedule, cfg.timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end)

  @property
  def num_timesteps(self) -> int:
    return int(self.betas.shape[0])


def respace(spec: str | int, num_timesteps: int) -> np.ndarray:
  """The training timesteps a sampler visits, ascending (GLIDE/ADM `space_timesteps` semantics).

  Args:
    spec: "N" or N (N evenly spaced steps including 0 and T-1), "a,b,c" (the range split into equal sections
      with a, b, c steps each), or "ddimN" (integer stride, as DDIM and diffusers' "leading" spacing).
    num_timesteps: T.
  Returns:
    int32 [N] sorted unique timesteps.
  """
  if isinstance(spec, (int, np.integer)):
    spec = str(int(spec))
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"sampling steps must be a non-empty string like '25', '10,10,5' or 'ddim50', got {spec!r}")
  spec = spec.strip()
  if spec.startswith("ddim"):
    count = _parse_count(spec[len("ddim"):], spec)
    _check_count(count, num_timesteps, spec)
    for stride in range(1, num_timesteps + 1):
      if len(range(0, num_timesteps, stride)) == count:
        return np.arange(0, num_timesteps, stride, dtype=np.int32)
    raise ValueError(f"sampling steps {spec!r}: no integer stride gives exactly {count} of {num_timesteps} steps")
  counts = [_parse_count(part, spec) for part in spec.split(",")]
  _check_count(sum(counts), num_timesteps, spec)
  size_per, extra = divmod(num_timesteps, len(counts))
  start, taken = 0, []
  for i, count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    if count > size:
      raise ValueError(f"sampling steps {spec!r}: section {i} asks for {count} steps but spans only {size}")
    stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
    taken += [start + round(j * stride) for j in range(count)]
    start += size
  return np.array(sorted(set(taken)), dtype=np.int32)


def _parse_count(text: str, spec: str) -> int:
  try:
    count = int(text)
  except ValueError:
    raise ValueError(f"sampling steps {spec!r}: {text!r} is not an integer step count") from None
  if count <= 0:
    raise ValueError(f"sampling steps {spec!r}: step counts must be positive, got {count}")
  return count


def _check_count(count: int, num_timesteps: int, spec: str) -> None:
  if count > num_timesteps:
    raise ValueError(f"sampling steps {spec!r}: {count} sampling steps exceed the {num_timesteps} training steps")


@dataclasses.dataclass(frozen=True, eq=False)
class StepTable:
  """Per sampling step (in sampling order, t descending) the quantities every update rule needs.

  All arrays are [N] numpy: `timesteps` int32 (original training indices, fed to the model),
  `alpha_bar` ᾱ_t, `alpha_bar_prev` ᾱ at the next visited timestep (1 after the last step), and `beta` the
  effective β of the jump, 1 - ᾱ_t/ᾱ_prev (see `step_table` for the UnCLIPScheduler variant).
  """
  timesteps: np.ndarray
  alpha_bar: np.ndarray
  alpha_bar_prev: np.ndarray
  beta: np.ndarray

  @property
  def num_steps(self) -> int:
    return int(self.timesteps.shape[0])

  def as_scan_inputs(self) -> dict[str, np.ndarray]:
    """The per-step arrays to scan over, plus the step index."""
    return dict(index=np.arange(self.num_steps, dtype=np.int32), t=self.timesteps, alpha_bar=self.alpha_bar,
                alpha_bar_prev=self.alpha_bar_prev, beta=self.beta)


SINGLE_STEP_BETAS = ("ratio", "schedule")


def step_table(schedule: NoiseSchedule, steps: str | int, single_step_beta: str = "ratio") -> StepTable:
  """The sampling-order StepTable for a respacing spec (see `respace`).

  Args:
    single_step_beta: β of a jump that spans one training step (t -> t-1, always the final t=0 step):
      "ratio" recomputes 1 - ᾱ_t/ᾱ_prev like every other jump (GLIDE/ADM, Karlo's original code, diffusers'
      DDPM/DDIM); "schedule" takes the table's β_t, as diffusers' UnCLIPScheduler does. They differ only by
      float32 rounding of ᾱ, which scales the final x̂0 by up to ~5e-4 relative.
  """
  if single_step_beta not in SINGLE_STEP_BETAS:
    raise ValueError(f"unknown single_step_beta {single_step_beta!r}; choose one of {SINGLE_STEP_BETAS}")
  kept = respace(steps, schedule.num_timesteps)[::-1]                    # descending
  prev = np.concatenate([kept[1:], np.array([-1], np.int32)])
  alpha_bar = schedule.alphas_cumprod[kept]
  alpha_bar_prev = np.where(prev >= 0, schedule.alphas_cumprod[np.maximum(prev, 0)], np.float32(1.0))
  alpha_bar_prev = alpha_bar_prev.astype(np.float32)
  jump_beta = (np.float32(1.0) - alpha_bar / alpha_bar_prev).astype(np.float32)
  if single_step_beta == "schedule":
    jump_beta = np.where(prev == kept - 1, schedule.betas[kept], jump_beta)
  beta = jump_beta.astype(np.float32)
  return StepTable(timesteps=kept.astype(np.int32), alpha_bar=alpha_bar, alpha_bar_prev=alpha_bar_prev, beta=beta)
