"""The optax optimiser every stage trains with, built from the config's `optim` block."""
from __future__ import annotations

import jax
import optax


def learning_rate_schedule(cfg) -> optax.Schedule:
  """Linear warmup from 0 to `optim.lr` over `optim.warmup_steps`, then cosine decay to
  `optim.final_lr_fraction`·lr at `num_train_steps`."""
  o = cfg.optim
  warmup = max(int(o.warmup_steps), 0)
  total = max(int(cfg.num_train_steps), warmup + 1)
  return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=o.lr, warmup_steps=warmup,
                                            decay_steps=total, end_value=o.lr * o.get("final_lr_fraction", 0.0))


def weight_decay_mask(params):
  """Decay matrices and conv kernels only: no decay on biases, norm scales, embeddings vectors."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW(schedule, masked weight decay), wrapped in MultiSteps for accumulation."""
  o = cfg.optim
  if o.lr <= 0:
    raise ValueError(f"optim.lr must be positive, got {o.lr}")
  if int(o.grad_accum) < 1:
    raise ValueError(f"optim.grad_accum must be >= 1, got {o.grad_accum}")
  parts = []
  if o.grad_clip and o.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip))
  parts.append(optax.adamw(learning_rate_schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                           mask=weight_decay_mask))
  tx = optax.chain(*parts)
  if int(o.grad_accum) > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=int(o.grad_accum))
  return tx
