"""PyTorch <-> unclip_jax weight conversion for the diffusion prior, both directions.

Layouts (ARCHITECTURE.md §8.1, §8.5, §9.1-9.2):
  * diffusers `PriorTransformer`: a folder with `config.json` + `diffusion_pytorch_model.safetensors`, as
    `save_pretrained` writes it. Keys mirror our module names (`transformer_blocks.3.attn1.to_out.0.weight` ↔
    `transformer_blocks_3/attn1/to_out_0/kernel`); Linear weights are transposed, LayerNorm `weight` is `scale`.
  * original Karlo prior: Lightning `state_dict` with `model.`-prefixed keys, fused per-head interleaved `c_qkv`
    (rows [q_h0, k_h0, v_h0, q_h1, ...], each `head_dim` long), and CLIP statistics kept in a separate file
    (`ViT-L-14_stats.th` = (mean[E], std[E])).

Every import checks names and shapes against `jax.eval_shape(init)` of the model built from the config: a missing,
unexpected or mis-shaped key raises a ValueError naming it. No torch is needed except to read `.ckpt`/`.th` files
(`torch.load(weights_only=True)`); diffusers folders are read with safetensors.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import jax
import ml_collections as mlc
import numpy as np

from unclip_jax.models import prior as prior_lib

SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
KARLO_PREFIX = "model."
# diffusers PriorTransformer options whose non-default values we do not implement (Karlo uses the defaults).
_DIFFUSERS_FIXED_OPTIONS = dict(time_embed_act_fn="silu", norm_in_type=None, embedding_proj_norm_type=None,
                                encoder_hid_proj_type="linear", added_emb_type="prd")
_RAW_PARAMS = ("positional_embedding", "prd_embedding", "clip_mean", "clip_std")
_NORMS = ("norm1", "norm3", "norm_out")
_INDEXED = ("transformer_blocks", "to_out", "net")   # torch ModuleLists/Sequentials: `name.<i>` <-> `name_<i>`

Params = dict[str, Any]


# ---- config ---------------------------------------------------------------------------------------------------
def model_config_from_diffusers(config: Mapping[str, Any]) -> mlc.ConfigDict:
  """diffusers `PriorTransformer` config.json dict -> our `configs/prior.py` `model` block."""
  cls = config.get("_class_name", "PriorTransformer")
  if cls != "PriorTransformer":
    raise ValueError(f"config.json describes a {cls!r}, not a 'PriorTransformer'")
  for key, default in _DIFFUSERS_FIXED_OPTIONS.items():
    if config.get(key, default) != default:
      raise ValueError(f"PriorTransformer option {key}={config[key]!r} is not supported (only {default!r})")
  heads, head_dim = config.get("num_attention_heads", 32), config.get("attention_head_dim", 64)
  e = config.get("embedding_dim", 768)
  for key, want in (("time_embed_dim", heads * head_dim), ("embedding_proj_dim", e), ("clip_embed_dim", e)):
    if config.get(key) not in (None, want):
      raise ValueError(f"PriorTransformer option {key}={config[key]!r} is not supported (only None or {want})")
  return mlc.ConfigDict(dict(
      embedding_dim=e, num_embeddings=config.get("num_embeddings", 77), num_layers=config.get("num_layers", 20),
      num_heads=heads, head_dim=head_dim, additional_embeddings=config.get("additional_embeddings", 4),
      normalization="clip_stats", dropout=float(config.get("dropout", 0.0))))


def diffusers_config_from_model(model_cfg) -> dict[str, Any]:
  """Our `model` block -> diffusers `PriorTransformer` config.json dict."""
  if model_cfg.get("normalization", "clip_stats") != "clip_stats":
    raise ValueError("only normalization='clip_stats' has a diffusers equivalent (post_process_latents)")
  return {"_class_name": "PriorTransformer", "_diffusers_version": "0.42.1",
          "num_attention_heads": model_cfg.num_heads, "attention_head_dim": model_cfg.head_dim,
          "num_layers": model_cfg.num_layers, "embedding_dim": model_cfg.embedding_dim,
          "num_embeddings": model_cfg.num_embeddings,
          "additional_embeddings": model_cfg.get("additional_embeddings", 4),
          "dropout": float(model_cfg.get("dropout", 0.0)), **_DIFFUSERS_FIXED_OPTIONS,
          "time_embed_dim": None, "embedding_proj_dim": None, "clip_embed_dim": None}


def _abstract_flat(model_cfg) -> dict[tuple[str, ...], tuple[int, ...]]:
  model = prior_lib.from_config(model_cfg, dtype="float32", remat=False)
  abstract = prior_lib.abstract_params(model)
  return {tuple(k.key for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}


# ---- diffusers keys <-> param paths ---------------------------------------------------------------------------
def _diffusers_key_to_path(key: str) -> tuple[tuple[str, ...], str]:
  """'transformer_blocks.3.attn1.to_out.0.weight' -> (('transformer_blocks_3','attn1','to_out_0','kernel'), kind).

  kind: 'linear' (transpose), 'norm' or 'raw' (copy).
  """
  if key in _RAW_PARAMS:
    return (key,), "raw"
  parts = re.sub(r"\.(\d+)(?=\.|$)", r"_\1", key).split(".")
  *module, leaf = parts
  if not module or leaf not in ("weight", "bias"):
    raise ValueError(f"unexpected diffusers prior key {key!r}")
  is_norm = module[-1] in _NORMS
  if leaf == "weight":
    return tuple(module) + ("scale" if is_norm else "kernel",), ("norm" if is_norm else "linear")
  return tuple(module) + ("bias",), "norm" if is_norm else "linear"


def _path_to_diffusers_key(path: tuple[str, ...]) -> str:
  if len(path) == 1:
    return path[0]
  *module, leaf = path
  name = ".".join(re.sub(r"_(\d+)$", r".\1", m) if m.rsplit("_", 1)[0] in _INDEXED else m for m in module)
  return f"{name}.{'bias' if leaf == 'bias' else 'weight'}"


def _nest(flat: Mapping[tuple[str, ...], np.ndarray]) -> Params:
  out: Params = {}
  for path, value in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return out


def _flatten(params: Params) -> dict[tuple[str, ...], np.ndarray]:
  return {tuple(k.key for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def diffusers_to_params(state: Mapping[str, Any], model_cfg) -> Params:
  """diffusers state dict (numpy or torch tensors) -> our float32 params, checked against eval_shape(init)."""
  expected = _abstract_flat(model_cfg)
  flat = {}
  for key, value in state.items():
    path, kind = _diffusers_key_to_path(key)
    if path not in expected:
      raise ValueError(f"unexpected key {key!r} in the diffusers prior state dict (no parameter {'/'.join(path)})")
    arr = _to_numpy(value, key)
    if kind == "linear" and path[-1] == "kernel":
      if arr.ndim != 2:
        raise ValueError(f"{key!r}: expected a 2-D Linear weight, got shape {arr.shape}")
      arr = arr.T
    if arr.shape != expected[path]:
      raise ValueError(f"{key!r}: shape {_torch_shape(arr, kind, path)} does not match the model "
                       f"(expected {_torch_shape(np.empty(expected[path]), kind, path)})")
    flat[path] = arr.astype(np.float32)
  missing = [_path_to_diffusers_key(p) for p in expected if p not in flat]
  if missing:
    raise ValueError(f"diffusers prior state dict is missing keys: {missing}")
  return _nest(flat)


def params_to_diffusers(params: Params, model_cfg=None) -> dict[str, np.ndarray]:
  """Our params -> diffusers state dict (float32 numpy, torch layouts). Checks the tree if model_cfg is given.

  Scanned trees (`scan_layers=True`) are unstacked first; imports always return the looped layout
  (`prior.stack_blocks` converts).
  """
  if "transformer_blocks" in params:
    params = prior_lib.unstack_blocks(params)
  flat = _flatten(params)
  if model_cfg is not None:
    _check_tree(flat, _abstract_flat(model_cfg))
  out = {}
  for path, arr in flat.items():
    arr = np.asarray(arr, np.float32)
    out[_path_to_diffusers_key(path)] = np.ascontiguousarray(arr.T if path[-1] == "kernel" else arr)
  return out


def _check_tree(flat, expected):
  for path in flat:
    if path not in expected:
      raise ValueError(f"unexpected parameter {'/'.join(path)}")
    if tuple(flat[path].shape) != expected[path]:
      raise ValueError(f"parameter {'/'.join(path)} has shape {tuple(flat[path].shape)}, expected {expected[path]}")
  missing = ["/".join(p) for p in expected if p not in flat]
  if missing:
    raise ValueError(f"params are missing {missing}")


def _torch_shape(arr, kind, path):
  return tuple(arr.T.shape) if kind == "linear" and path[-1] == "kernel" else tuple(arr.shape)


def _to_numpy(value, key: str) -> np.ndarray:
  if hasattr(value, "detach"):                       # torch.Tensor, without importing torch here
    value = value.detach().cpu().float().numpy()
  arr = np.asarray(value)
  if not np.issubdtype(arr.dtype, np.floating):
    raise ValueError(f"{key!r}: expected a floating-point tensor, got dtype {arr.dtype}")
  return arr


# ---- diffusers folders ----------------------------------------------------------------------------------------
def load_diffusers(folder: str | os.PathLike) -> tuple[mlc.ConfigDict, Params]:
  """Reads a diffusers `PriorTransformer` folder (config.json + safetensors) -> (model config, params)."""
  folder = os.fspath(folder)
  cfg_path, st_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, SAFETENSORS_NAME)
  for path in (cfg_path, st_path):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"diffusers prior file not found: {path}")
  try:
    with open(cfg_path) as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"cannot read diffusers prior config {cfg_path}: {e}") from e
  model_cfg = model_config_from_diffusers(config)
  return model_cfg, diffusers_to_params(read_safetensors(st_path), model_cfg)


def save_diffusers(folder: str | os.PathLike, params: Params, model_cfg) -> None:
  """Writes a folder that diffusers' `PriorTransformer.from_pretrained(folder)` loads."""
  from safetensors.numpy import save_file

  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  state = params_to_diffusers(params, model_cfg)
  with open(os.path.join(folder, CONFIG_NAME), "w") as f:
    json.dump(diffusers_config_from_model(model_cfg), f, indent=2, sort_keys=True)
  save_file(state, os.path.join(folder, SAFETENSORS_NAME), metadata={"format": "pt"})


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file as numpy (bf16 files are widened to float32)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"safetensors file not found: {path}")
  from safetensors import SafetensorError, safe_open

  try:
    out = {}
    with safe_open(path, framework="numpy") as f:
      for key in f.keys():
        out[key] = f.get_tensor(key)
    return out
  except (SafetensorError, OSError, ValueError, TypeError) as e:
    raise ValueError(f"cannot read safetensors file {path}: {e}") from e


# ---- original Karlo layout ------------------------------------------------------------------------------------
_KARLO_TOP = {                                        # Karlo module (prefix stripped) -> diffusers module
    "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
    "clip_img_proj": "proj_in", "text_emb_proj": "embedding_proj", "text_enc_proj": "encoder_hidden_states_proj",
    "final_ln": "norm_out", "out_proj": "proj_to_clip_embeddings",
}
_KARLO_BLOCK = {"attn.c_proj": "attn1.to_out.0", "mlp.c_fc": "ff.net.0.proj", "mlp.c_proj": "ff.net.2",
                "ln_1": "norm1", "ln_2": "norm3"}
_KARLO_RAW = {"positional_embedding": "positional_embedding", "prd_emb": "prd_embedding"}
_KARLO_IGNORED = ("causal_mask",)                     # non-persistent buffers, ignored if a file has them


def split_heads(weight: np.ndarray, bias: np.ndarray, num_heads: int, head_dim: int, k: int = 3):
  """Per-head interleaved fused projection -> k separate ones (§9.1).

  Args:
    weight: [k·H·d, Cin] torch Linear/Conv1d-squeezed weight, rows [q_h0, k_h0, v_h0, q_h1, ...].
    bias: [k·H·d].
  Returns:
    ([w_0..w_{k-1}] each [H·d, Cin], [b_0..b_{k-1}] each [H·d]).
  """
  rows = k * num_heads * head_dim
  if weight.ndim != 2 or weight.shape[0] != rows or bias.shape != (rows,):
    raise ValueError(f"fused projection must be [{rows}, Cin] with bias [{rows}] for {num_heads} heads × "
                     f"{head_dim} × {k}; got {weight.shape} and {bias.shape}")
  w4 = weight.reshape(num_heads, k, head_dim, weight.shape[1])
  b3 = bias.reshape(num_heads, k, head_dim)
  return ([w4[:, i].reshape(num_heads * head_dim, -1) for i in range(k)],
          [b3[:, i].reshape(-1) for i in range(k)])


def join_heads(weights, biases, num_heads: int, head_dim: int):
  """Inverse of `split_heads`: k weights [H·d, Cin] / biases [H·d] -> interleaved [k·H·d, Cin], [k·H·d]."""
  w = np.stack([x.reshape(num_heads, head_dim, -1) for x in weights], axis=1)
  b = np.stack([x.reshape(num_heads, head_dim) for x in biases], axis=1)
  return w.reshape(-1, w.shape[-1]), b.reshape(-1)


def karlo_to_diffusers_state(state: Mapping[str, Any], model_cfg, clip_stats=None) -> dict[str, np.ndarray]:
  """Karlo prior state dict (`model.`-prefixed or not) + CLIP stats (mean[E], std[E]) -> diffusers state dict."""
  heads, head_dim = model_cfg.num_heads, model_cfg.head_dim
  src = {}
  for key, value in state.items():
    name = key[len(KARLO_PREFIX):] if key.startswith(KARLO_PREFIX) else key
    if name in _KARLO_IGNORED:
      continue
    src[name] = _to_numpy(value, key)
  used, out = set(), {}

  def take(name):
    if name not in src:
      raise ValueError(f"Karlo prior state dict is missing key {KARLO_PREFIX + name!r}")
    used.add(name)
    return src[name]

  for karlo, diff in _KARLO_RAW.items():
    out[diff] = take(karlo)
  for karlo, diff in _KARLO_TOP.items():
    for leaf in ("weight", "bias"):
      out[f"{diff}.{leaf}"] = take(f"{karlo}.{leaf}")
  for i in range(model_cfg.num_layers):
    pre = f"transformer.resblocks.{i}"
    (wq, wk, wv), (bq, bk, bv) = split_heads(take(f"{pre}.attn.c_qkv.weight"), take(f"{pre}.attn.c_qkv.bias"),
                                             heads, head_dim, 3)
    for name, w, b in (("to_q", wq, bq), ("to_k", wk, bk), ("to_v", wv, bv)):
      out[f"transformer_blocks.{i}.attn1.{name}.weight"], out[f"transformer_blocks.{i}.attn1.{name}.bias"] = w, b
    for karlo, diff in _KARLO_BLOCK.items():
      for leaf in ("weight", "bias"):
        out[f"transformer_blocks.{i}.{diff}.{leaf}"] = take(f"{pre}.{karlo}.{leaf}")
  extra = sorted(set(src) - used - {"clip_mean", "clip_std"})
  if extra:
    raise ValueError(f"unexpected keys in the Karlo prior state dict: {[KARLO_PREFIX + k for k in extra]}")
  mean, std = _clip_stats(src, clip_stats, model_cfg.embedding_dim)
  out["clip_mean"], out["clip_std"] = mean, std
  return out


def _clip_stats(src, clip_stats, e):
  if clip_stats is None:
    if "clip_mean" in src and "clip_std" in src:
      mean, std = src["clip_mean"], src["clip_std"]
    else:
      raise ValueError("the Karlo prior checkpoint has no CLIP statistics: pass clip_stats=(mean, std) "
                       "(Karlo's ViT-L-14_stats.th)")
  else:
    mean, std = (_to_numpy(x, name) for x, name in zip(clip_stats, ("clip_mean", "clip_std")))
  mean, std = mean.reshape(1, -1), std.reshape(1, -1)
  if mean.shape != (1, e) or std.shape != (1, e):
    raise ValueError(f"CLIP stats must have {e} entries each, got mean {mean.shape} and std {std.shape}")
  return mean, std


def diffusers_to_karlo_state(state: Mapping[str, np.ndarray], model_cfg) -> tuple[dict[str, np.ndarray],
                                                                                   tuple[np.ndarray, np.ndarray]]:
  """diffusers state dict -> (Karlo `model.`-prefixed state dict, (clip mean[E], clip std[E]))."""
  heads, head_dim = model_cfg.num_heads, model_cfg.head_dim
  out = {}
  for karlo, diff in _KARLO_RAW.items():
    out[KARLO_PREFIX + karlo] = state[diff]
  for karlo, diff in _KARLO_TOP.items():
    for leaf in ("weight", "bias"):
      out[f"{KARLO_PREFIX}{karlo}.{leaf}"] = state[f"{diff}.{leaf}"]
  for i in range(model_cfg.num_layers):
    pre, dpre = f"{KARLO_PREFIX}transformer.resblocks.{i}", f"transformer_blocks.{i}.attn1"
    w, b = join_heads([state[f"{dpre}.to_{n}.weight"] for n in "qkv"], [state[f"{dpre}.to_{n}.bias"] for n in "qkv"],
                      heads, head_dim)
    out[f"{pre}.attn.c_qkv.weight"], out[f"{pre}.attn.c_qkv.bias"] = w, b
    for karlo, diff in _KARLO_BLOCK.items():
      for leaf in ("weight", "bias"):
        out[f"{pre}.{karlo}.{leaf}"] = state[f"transformer_blocks.{i}.{diff}.{leaf}"]
  return out, (np.asarray(state["clip_mean"]).reshape(-1), np.asarray(state["clip_std"]).reshape(-1))


def karlo_to_params(state: Mapping[str, Any], model_cfg, clip_stats=None) -> Params:
  """Karlo prior state dict (+ CLIP stats) -> our params, checked against eval_shape(init)."""
  return diffusers_to_params(karlo_to_diffusers_state(state, model_cfg, clip_stats), model_cfg)


def params_to_karlo(params: Params, model_cfg):
  """Our params -> (Karlo `model.`-prefixed state dict, (clip mean[E], clip std[E])), numpy float32."""
  return diffusers_to_karlo_state(params_to_diffusers(params, model_cfg), model_cfg)


def karlo_model_config(**overrides) -> mlc.ConfigDict:
  """The Karlo prior (prior_1B_vit_l.yaml) as our model block; override fields for other sizes."""
  cfg = mlc.ConfigDict(dict(embedding_dim=768, num_embeddings=77, num_layers=20, num_heads=32, head_dim=64,
                            additional_embeddings=4, normalization="clip_stats", dropout=0.0))
  cfg.update(overrides)
  return cfg


def load_karlo(ckpt_path: str | os.PathLike, stats_path: str | os.PathLike | None, model_cfg=None):
  """Reads Karlo's prior `.ckpt` (Lightning) and `ViT-L-14_stats.th` -> (model config, params).

  Files are read with `torch.load(weights_only=True)` (never unpickling arbitrary objects); a `.safetensors`
  state dict is read with safetensors.
  """
  model_cfg = model_cfg or karlo_model_config()
  ckpt = _load_torch_or_safetensors(ckpt_path)
  state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
  if not isinstance(state, dict):
    raise ValueError(f"{ckpt_path}: expected a state dict (or a Lightning checkpoint with 'state_dict')")
  stats = None
  if stats_path is not None:
    stats = _load_torch_or_safetensors(stats_path)
    if isinstance(stats, dict):
      stats = (stats.get("mean", stats.get("clip_mean")), stats.get("std", stats.get("clip_std")))
    if not isinstance(stats, (tuple, list)) or len(stats) != 2 or any(s is None for s in stats):
      raise ValueError(f"{stats_path}: expected (mean, std) CLIP statistics")
  return model_cfg, karlo_to_params(state, model_cfg, stats)


def _load_torch_or_safetensors(path):
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  import torch

  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt or unsafe files
    raise ValueError(f"cannot read checkpoint {path} with torch.load(weights_only=True): {e}") from e
