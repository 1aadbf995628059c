"""The optax optimiser every stage trains with, built from the config's `optim` block."""
from __future__ import annotations

import re

import jax
import optax

# Parameters that are embeddings or data statistics rather than weight matrices: never weight-decayed.
NO_DECAY_NAMES = ("embedding", "clip_mean", "clip_std", "logit_scale", "learned_classifier_free_guidance")


def learning_rate_schedule(cfg) -> optax.Schedule:
  """Linear warmup from 0 to `optim.lr` over `optim.warmup_steps`, then cosine decay to
  `optim.final_lr_fraction`·lr at `num_train_steps`."""
  o = cfg.optim
  warmup = max(int(o.warmup_steps), 0)
  total = max(int(cfg.num_train_steps), warmup + 1)
  return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=o.lr, warmup_steps=warmup,
                                            decay_steps=total, end_value=o.lr * o.final_lr_fraction)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def weight_decay_mask(params):
  """Decay matrices and conv kernels only: no decay on biases, norm scales, embeddings or statistics."""
  def decays(path, p):
    name = _path_str(path)
    return p.ndim >= 2 and not any(n in name for n in NO_DECAY_NAMES)
  return jax.tree_util.tree_map_with_path(decays, params)


def frozen_labels(params, patterns) -> object:
  """'frozen' for parameters whose path matches one of the regex `patterns`, else 'train'."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if any(c.search(_path_str(path)) for c in compiled) else "train", params)


def make_optimizer(cfg) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW(schedule, masked weight decay); parameters matching `optim.frozen`
  (e.g. the prior's CLIP statistics) get zero updates; MultiSteps wraps it for gradient accumulation."""
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
  frozen = tuple(o.frozen)
  if frozen:
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               lambda params: frozen_labels(params, frozen))
  if int(o.grad_accum) > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=int(o.grad_accum))
  return tx
