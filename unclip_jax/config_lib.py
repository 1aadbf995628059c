"""Shared config pieces for `configs/<stage>.py`, the loader every entry point uses, and the config schema.

Each stage file defines `get_config(arg)` where `arg` names a size variant ("tiny" for tests, "karlo" for the
published sizes, ...). Configs are ml_collections ConfigDicts; they are locked after loading so a misspelt
override is an error, never a silently ignored key.

The configs are the schema: every field the code reads is declared in `configs/<stage>.py`. A config saved by an
older version (in a bundle or a training checkpoint) is read through `complete`, which fills the fields added since
from the stage's defaults and applies the listed renames; an unknown field is an error.

The `configs/` folder ships with the package as `unclip_jax.configs`, so `load_config("decoder:tiny")` (or
"decoder.py:tiny") works from any installation; a path to a file works too.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import pathlib
from typing import Any, Iterable, Mapping, Sequence

import ml_collections as mlc

STAGES = ("clip", "prior", "ar_prior", "decoder", "upsampler")
CONFIG_PACKAGE = "unclip_jax.configs"

# Logical axis name -> mesh axes. Conv UNets and transformers share one rule set.
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


def inpainting_config() -> dict[str, Any]:
  """The decoder's inpainting knobs (its `sampling` block; see stages/decoder.py)."""
  return dict(inpaint_method="auto",   # "auto" | "glide" (inpaint channels + x̂0 paste) | "repaint"
              resample_jumps=1)        # RePaint's r: renoise/denoise repetitions per step


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
  c.remat_policy = "none"     # "none", "full", "dots_saveable", ... (models.layers.REMAT_POLICIES), every block
  return c


def config_dir() -> pathlib.Path:
  """The folder of the built-in `configs/<stage>.py` files: the installed `unclip_jax.configs` package, or the
  `configs/` folder beside the package in a checkout."""
  spec = importlib.util.find_spec(CONFIG_PACKAGE) if importlib.util.find_spec("unclip_jax") else None
  if spec is not None and spec.submodule_search_locations:
    return pathlib.Path(list(spec.submodule_search_locations)[0])
  here = pathlib.Path(__file__).resolve().parent.parent / "configs"
  if here.is_dir():
    return here
  raise FileNotFoundError(f"the built-in configs ({CONFIG_PACKAGE}) are not installed")


def builtin_names() -> list[str]:
  return sorted(p.stem for p in config_dir().glob("*.py") if not p.name.startswith("_"))


def resolve_spec(spec: str) -> str:
  """`path/to/x.py[:variant]`, or a built-in `stage[.py][:variant]` -> `absolute/path.py[:variant]`.

  Raises FileNotFoundError naming the built-in configs when neither a file nor a built-in name matches."""
  path, sep, arg = spec.partition(":")
  if pathlib.Path(path).is_file():
    return spec
  name = path[:-3] if path.endswith(".py") else path
  if "/" not in path and name and (config_dir() / f"{name}.py").is_file():
    return str(config_dir() / f"{name}.py") + (sep + arg if sep else "")
  raise FileNotFoundError(f"config file not found: {path} (built-in configs: {', '.join(builtin_names())}, "
                          "e.g. decoder:karlo)")


def load_config(spec: str, overrides: Sequence[str] = ()) -> mlc.ConfigDict:
  """Loads `path/to/stage.py[:variant]` or a built-in `stage[:variant]`, applies `key.sub=value` overrides and
  locks the result.

  Raises:
    FileNotFoundError: the config file does not exist.
    ValueError: the file has no `get_config`, the variant is unknown, or an override is malformed.
    KeyError: an override names a key the config does not have.
  """
  path, _, arg = resolve_spec(spec).partition(":")
  file = pathlib.Path(path)
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


def default_config(stage: str) -> mlc.ConfigDict:
  """The built-in config of `stage` at its default variant (unlocked)."""
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
  return mlc.ConfigDict(load_config(stage).to_dict())


# ---- saved configs ------------------------------------------------------------------------------------------------
def _tuples(x):
  """JSON lists -> tuples, recursively (configs/*.py use tuples for every sequence)."""
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return tuple(_tuples(v) for v in x)
  return x


def to_dict(cfg) -> dict[str, Any]:
  """ConfigDict (or dict) -> plain JSON-able dict (tuples become lists)."""
  d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  return json.loads(json.dumps(d))


def from_dict(d: Mapping[str, Any]) -> mlc.ConfigDict:
  """JSON dict -> ConfigDict with tuples for sequences, like `configs/<stage>.py` builds it (not completed)."""
  return mlc.ConfigDict(_tuples(dict(d)))


def _migrate(d: dict[str, Any]) -> dict[str, Any]:
  """Renames of fields in configs saved by older versions (applied before completion)."""
  model = d.get("model")
  if isinstance(model, dict) and "remat" in model:        # model.remat (bool) -> remat_policy (one name per stage)
    if model.pop("remat") and d.get("remat_policy", "none") == "none":
      d["remat_policy"] = "full"
  return d


def _merge(defaults: Any, saved: Any, where: str) -> Any:
  if isinstance(defaults, Mapping) and isinstance(saved, Mapping):
    unknown = sorted(set(saved) - set(defaults))
    if unknown:
      raise KeyError(f"unknown config field {where + '.' if where else ''}{unknown[0]}")
    return {k: _merge(defaults[k], saved[k], f"{where}.{k}" if where else k) if k in saved else defaults[k]
            for k in defaults}
  return saved


def complete(saved: Mapping[str, Any]) -> mlc.ConfigDict:
  """A saved stage config (JSON dict) -> a full ConfigDict of the current schema.

  Fields added since it was saved take the stage's defaults; renamed fields are migrated; an unknown field is a
  KeyError naming it (a config from a newer version, or a damaged one)."""
  d = _migrate(json.loads(json.dumps(dict(saved))))
  stage = d.get("stage")
  if stage not in STAGES:
    raise ValueError(f"saved config has stage {stage!r}; expected one of {STAGES}")
  defaults = to_dict(default_config(stage))
  return from_dict(_merge(defaults, d, ""))


def apply_override(cfg: mlc.ConfigDict, item: str) -> None:
  """Applies one `a.b.c=value` override; the value is parsed as a Python literal when it is one."""
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
