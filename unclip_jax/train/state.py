"""TrainState: step, params, EMA params, optimiser state — everything a checkpoint stores."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # int32 scalar: optimiser steps taken (skipped non-finite steps included)
  params: Any
  ema_params: Any
  opt_state: optax.OptState

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
               opt_state=tx.init(params))


def ema_update(ema_params, params, decay: float):
  """ema <- decay·ema + (1 - decay)·params, leaf by leaf."""
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema_params, params)
