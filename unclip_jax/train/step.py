"""The generic train step: gradients, non-finite detection and skipping, optimiser update, EMA.

Each stage supplies `loss_fn(params, batch, rng) -> (loss, metrics)`; the step folds the step count into the
base key so a resumed run draws the same randomness as an uninterrupted one.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from unclip_jax.train.state import TrainState, ema_update

LossFn = Callable[..., tuple[jax.Array, dict]]


def ema_decay_at(decay: float, updates: jax.Array, warmup: bool) -> jax.Array:
  """The EMA decay for the `updates`-th update: `decay`, or with warmup min(decay, (1 + n) / (10 + n)), so the
  average of a short run is not dominated by the initial weights (0.999^1000 still keeps 37% of them)."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  n = updates.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, ema_decay: float,
                    grad_accum: int = 1, lr_schedule: optax.Schedule | None = None, ema_warmup: bool = False):
  """Returns `train_step(state, batch, base_rng) -> (state, metrics)` (pure; jit it with shardings).

  A step whose loss or gradient norm is NaN/Inf leaves params, EMA and optimiser state untouched, counts as
  a step (so the data and RNG streams stay aligned) and reports `skipped=1`. With `grad_accum` k > 1 (tx
  wrapped in optax.MultiSteps) the parameters change every k-th micro-step, and so does the EMA.
  """
  def train_step(state: TrainState, batch, base_rng: jax.Array):
    rng = jax.random.fold_in(base_rng, state.step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    applied = (state.step + 1) % grad_accum == 0
    decay = ema_decay_at(ema_decay, state.step // grad_accum, ema_warmup)
    ema = jax.tree.map(lambda new, old: jnp.where(applied, new, old),
                       ema_update(state.ema_params, params, decay), state.ema_params)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              ema_params=keep(ema, state.ema_params), opt_state=keep(opt_state, state.opt_state))
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, skipped=(~finite).astype(jnp.int32))
    if lr_schedule is not None:
      metrics["lr"] = lr_schedule(state.step // grad_accum)
    return new_state, metrics

  return train_step
