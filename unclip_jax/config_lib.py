"""Shared config pieces for `configs/<stage>.py` and the loader used by every entry point.

Each stage file defines `get_config(arg)` where `arg` names a size variant ("tiny" for tests, "karlo" for the
published sizes, ...). Configs are ml_collections ConfigDicts; they are locked after loading so a misspelt
override is an error, never a silently ignored key.
"""
from __future__ import annotations

import importlib.util
import pathlib
from typing import Iterable, Sequence

import ml_collections as mlc

STAGES = ("clip", "prior", "ar_prior", "decoder", "upsampler")

# Logical axis name -> mesh axes. Conv UNets and transformers share one rule set (STYLE.md §4.4).
AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("act_h", None),
    ("act_w", None),
    ("act_ch", None),
    ("length", None),
    ("layers", None),
)


def select_variant(arg: str, variants: Iterable[str], default: str) -> str:
  """Returns the variant named by `arg` ('' -> default); unknown names raise a ValueError listing choices."""
  variants = tuple(variants)
  name = arg or default
  if name not in variants:
    raise ValueError(f"unknown config variant {name!r}; choose one of {variants}")
  return name


def diffusion_config(*, prediction: str, variance: str, loss: str = "mse", schedule: str = "cosine",
                     timesteps: int = 1000, vlb_weight: float = 0.001,
                     loss_weighting: str = "uniform") -> mlc.ConfigDict:
  """The Gaussian-diffusion block shared by the prior, decoder and upsamplers (see diffusion/gaussian.py)."""
  return mlc.ConfigDict(dict(
      schedule=schedule,          # "cosine" (= squaredcos_cap_v2) or "linear"
      timesteps=timesteps,        # training steps T
      beta_start=1e-4,            # linear schedule only, scaled by 1000/T as in GLIDE
      beta_end=0.02,
      prediction=prediction,      # what the network outputs: "eps", "x0" or "v"
      variance=variance,          # "fixed_small", "fixed_small_log", "fixed_large" or "learned_range"
      loss=loss,                  # "mse" or "hybrid" (mse + vlb_weight * T * VLB term, bits/dim)
      vlb_weight=vlb_weight,
      loss_weighting=loss_weighting,  # "uniform" or "min_snr" (MSE of step t weighted min(SNR_t, γ) in x0 terms)
      min_snr_gamma=5.0,          # γ of "min_snr" (Hang et al. 2023)
  ))


def sampling_config(*, steps: str = "25", sampler: str = "ddpm", eta: float = 0.0, guidance_scale: float = 1.0,
                    clip_denoised: bool = True, clip_range: float = 1.0,
                    dynamic_threshold: float = 0.0) -> mlc.ConfigDict:
  """Sampler knobs (see diffusion/samplers.py). `steps` is a respacing spec: "25", "10,10,5" or "ddim50"."""
  return mlc.ConfigDict(dict(
      steps=steps, sampler=sampler, eta=eta, guidance_scale=guidance_scale,
      clip_denoised=clip_denoised, clip_range=clip_range, dynamic_threshold=dynamic_threshold,
      single_step_beta="ratio",   # "schedule" reproduces diffusers' UnCLIPScheduler bit for bit
  ))


def base_config(stage: str) -> mlc.ConfigDict:
  """Fields every stage has: stage name, seed, batch, optimisation, mesh and axis rules."""
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
  c = mlc.ConfigDict()
  c.stage = stage
  c.variant = ""
  c.seed = 0
  c.batch_size = 256
  c.num_train_steps = 1_000_000
  c.optim = mlc.ConfigDict(dict(lr=1e-4, warmup_steps=10_000, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
                                grad_clip=1.0, ema_decay=0.9999, ema_warmup=True, grad_accum=1, final_lr_fraction=0.0,
                                frozen=()))   # regexes of parameter paths that are never updated
  # Datasets written by `python -m unclip_jax.data.build` (several dirs are zipped by index, e.g. images +
  # their precomputed CLIP embeddings).
  c.data = mlc.ConfigDict(dict(dirs=(), split="train", workers=0, max_scale=1.0))
  c.log_every = 50
  # Every `eval_every` steps (and at the end; 0 = never) the stage's evaluation runs on `eval_examples` held
  # examples with the EMA params: sample metrics, and image grids for the decoder and upsamplers.
  c.eval_every = 5000
  c.eval_examples = 8
  c.ckpt_every = 1000
  c.keep_checkpoints = 3
  c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.axis_rules = AXIS_RULES
  c.fsdp_min_bytes = 4 * 2 ** 20   # tensors at least this big are FSDP-sharded even without logical axes
  c.sharding_tolerance = 0.02      # max fraction of parameter bytes left in large replicated tensors
  c.dtype = "bfloat16"        # compute dtype; parameters stay float32
  c.param_dtype = "float32"
  c.remat_policy = "none"     # "none", "full", "dots_saveable", ...
  return c


def load_config(spec: str, overrides: Sequence[str] = ()) -> mlc.ConfigDict:
  """Loads `path/to/stage.py[:variant]`, applies `key.sub=value` overrides and locks the result.

  Raises:
    FileNotFoundError: the config file does not exist.
    ValueError: the file has no `get_config`, the variant is unknown, or an override is malformed.
    KeyError: an override names a key the config does not have.
  """
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"config file not found: {path}")
  module_spec = importlib.util.spec_from_file_location(f"unclip_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path} defines no get_config(arg)")
  cfg = module.get_config(arg)
  cfg.lock()
  for item in overrides:
    apply_override(cfg, item)
  return cfg


def apply_override(cfg: mlc.ConfigDict, item: str) -> None:
  """Applies one `a.b.c=value` override; the value is parsed as a Python literal when it is one."""
  import ast

  key, sep, raw = item.partition("=")
  if not sep or not key:
    raise ValueError(f"config override must look like key=value, got {item!r}")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  *parents, leaf = key.split(".")
  node = cfg
  for i, name in enumerate(parents):
    if name not in node:
      raise KeyError(f"unknown config key {'.'.join(parents[:i + 1])!r} in override {item!r}")
    node = node[name]
  if leaf not in node:
    raise KeyError(f"unknown config key {key!r} in override {item!r}")
  current = node[leaf]
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  node[leaf] = value
