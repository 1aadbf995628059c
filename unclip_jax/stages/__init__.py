"""The five unCLIP stages, one module each, with one interface; `get(name)` returns a stage's module.

  clip       text + image towers, contrastive loss over the global batch, zero-shot and reranking
  prior      diffusion prior: text -> CLIP image embedding (loss on x̂0, CFG sampler, best-of-n)
  ar_prior   autoregressive prior: PCA + quantised codes, cross-entropy, guided sampling
  decoder    64² GLIDE/ADM UNet + text projection: hybrid loss, CFG sampler, inpainting
  upsampler  super-resolution UNets: ε-MSE on degraded crops, Karlo's first/last split

Every stage module exports:
  Models                      a NamedTuple of the stage's Linen modules (and its GaussianDiffusion, if any)
  build(cfg, dtype=None)      -> Models, from a `configs/<stage>.py` config
  init_params(models, rng)    -> the stage's parameter tree
  abstract_params(cfg)        -> the same tree of ShapeDtypeStructs (nothing allocated)
  loss_fn(params, batch, rng, ...) -> (loss, metrics)
  make_task(cfg, *, data=None, eval_data=None, mesh=None, ...) -> common.Task for `train.loop.train`
and the diffusion stages also `make_sampler(cfg, ...)` and `sample(...)` (their conditioning and null text live
beside them). Config blocks become Linen modules in `builders`, and nowhere else.
"""
from __future__ import annotations

import importlib
from types import ModuleType

NAMES = ("clip", "prior", "ar_prior", "decoder", "upsampler")
INTERFACE = ("Models", "build", "init_params", "abstract_params", "loss_fn", "make_task")


def get(name: str) -> ModuleType:
  """The stage module for `name` (one of NAMES); an unknown name is a ValueError listing them."""
  if name not in NAMES:
    raise ValueError(f"unknown stage {name!r}; choose one of {NAMES}")
  return importlib.import_module(f"unclip_jax.stages.{name}")


def make_task(cfg, **kwargs):
  """The training Task of `cfg.stage` (see each stage's `make_task`)."""
  return get(cfg.stage).make_task(cfg, **kwargs)
