"""PyTorch <-> unclip_jax weight conversion for the diffusion prior, both directions.

Layouts (docs/layouts.md, "Prior"):
  * diffusers `PriorTransformer`: a folder with `config.json` + `diffusion_pytorch_model.safetensors`, as
    `save_pretrained` writes it. Keys mirror our module names (`transformer_blocks.3.attn1.to_out.0.weight` ↔
    `transformer_blocks_3/attn1/to_out_0/kernel`); Linear weights are transposed, LayerNorm `weight` is `scale`.
  * original Karlo prior: Lightning `state_dict` with `model.`-prefixed keys, fused per-head interleaved `c_qkv`
    (rows [q_h0, k_h0, v_h0, q_h1, ...], each `head_dim` long), and CLIP statistics kept in a separate file
    (`ViT-L-14_stats.th` = (mean[E], std[E])).

Every import checks names and shapes against `jax.eval_shape(init)` of the model built from the config: a missing,
unexpected or mis-shaped key raises a ValueError naming it. No torch is needed except to read `.ckpt`/`.th` files
(`torch.load(weights_only=True)`); diffusers folders are read with safetensors. The key rule, transposes, file
I/O and head splitting are shared with the UNet converter (`torch_layout.py`); this file holds the prior's names.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import ml_collections as mlc
import numpy as np

from unclip_jax.convert import torch_layout as tl
from unclip_jax.convert.torch_layout import (CONFIG_NAME, SAFETENSORS_NAME, Params, join_heads,  # noqa: F401
                                          read_safetensors, split_heads)
from unclip_jax.stages import builders, prior as prior_stage

KARLO_PREFIX = "model."
# diffusers PriorTransformer options whose non-default values we do not implement (Karlo uses the defaults).
_DIFFUSERS_FIXED_OPTIONS = dict(time_embed_act_fn="silu", norm_in_type=None, embedding_proj_norm_type=None,
                                encoder_hid_proj_type="linear", added_emb_type="prd")
_LAYOUT = tl.Layout(raw=("positional_embedding", "prd_embedding", "clip_mean", "clip_std"),
                    norms=("norm1", "norm3", "norm_out"), indexed=("transformer_blocks", "to_out", "net"))
_WHAT = "diffusers prior"


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
      normalization="clip_stats", dropout=float(config.get("dropout", 0.0)), scan_layers=False, attention="auto"))


def diffusers_config_from_model(model_cfg) -> dict[str, Any]:
  """Our `model` block -> diffusers `PriorTransformer` config.json dict."""
  if model_cfg["normalization"] != "clip_stats":
    raise ValueError("only normalization='clip_stats' has a diffusers equivalent (post_process_latents)")
  return {"_class_name": "PriorTransformer", "_diffusers_version": tl.DIFFUSERS_VERSION,
          "num_attention_heads": model_cfg.num_heads, "attention_head_dim": model_cfg.head_dim,
          "num_layers": model_cfg.num_layers, "embedding_dim": model_cfg.embedding_dim,
          "num_embeddings": model_cfg.num_embeddings,
          "additional_embeddings": model_cfg["additional_embeddings"],
          "dropout": float(model_cfg["dropout"]), **_DIFFUSERS_FIXED_OPTIONS,
          "time_embed_dim": None, "embedding_proj_dim": None, "clip_embed_dim": None}


def _abstract_flat(model_cfg) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Shapes of the looped (unscanned) tree: the layout every converter reads and writes."""
  if model_cfg["scan_layers"]:
    model_cfg = mlc.ConfigDict({**model_cfg.to_dict(), "scan_layers": False})
  return tl.flat_shapes(builders.abstract(builders.init_prior, builders.prior(model_cfg)))


# ---- diffusers state dicts ------------------------------------------------------------------------------------
def diffusers_to_params(state: Mapping[str, Any], model_cfg) -> Params:
  """diffusers state dict (numpy or torch tensors) -> our float32 params, checked against eval_shape(init)."""
  return tl.state_to_params(state, _abstract_flat(model_cfg), _LAYOUT, _WHAT)


def params_to_diffusers(params: Params, model_cfg=None) -> dict[str, np.ndarray]:
  """Our params -> diffusers state dict (float32 numpy, torch layouts). Checks the tree if model_cfg is given.

  Scanned trees (`scan_layers=True`) are unstacked first; imports always return the looped layout
  (`stages.prior.stack_blocks` converts).
  """
  if "transformer_blocks" in params:
    params = prior_stage.unstack_blocks(params)
  return tl.params_to_state(params, None if model_cfg is None else _abstract_flat(model_cfg), _LAYOUT)


# ---- diffusers folders ----------------------------------------------------------------------------------------
def load_diffusers(folder: str | os.PathLike) -> tuple[mlc.ConfigDict, Params]:
  """Reads a diffusers `PriorTransformer` folder (config.json + safetensors) -> (model config, params)."""
  model_cfg, state = tl.read_diffusers_folder(folder, "prior", model_config_from_diffusers)
  return model_cfg, diffusers_to_params(state, model_cfg)


def save_diffusers(folder: str | os.PathLike, params: Params, model_cfg) -> None:
  """Writes a folder that diffusers' `PriorTransformer.from_pretrained(folder)` loads."""
  state = params_to_diffusers(params, model_cfg)
  tl.write_diffusers_folder(folder, diffusers_config_from_model(model_cfg), state)


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


def karlo_to_diffusers_state(state: Mapping[str, Any], model_cfg, clip_stats=None) -> dict[str, np.ndarray]:
  """Karlo prior state dict (`model.`-prefixed or not) + CLIP stats (mean[E], std[E]) -> diffusers state dict."""
  heads, head_dim = model_cfg.num_heads, model_cfg.head_dim
  src = {}
  for key, value in state.items():
    name = key[len(KARLO_PREFIX):] if key.startswith(KARLO_PREFIX) else key
    if name in _KARLO_IGNORED:
      continue
    src[name] = tl.to_numpy(value, key)
  take, out = tl.Taker(src, "Karlo prior", KARLO_PREFIX), {}
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
  extra = sorted(set(take.unused()) - {"clip_mean", "clip_std"})
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
    mean, std = (tl.to_numpy(x, name) for x, name in zip(clip_stats, ("clip_mean", "clip_std")))
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
  state = tl.load_torch_state(ckpt_path)
  stats = None
  if stats_path is not None:
    stats = tl.load_torch_file(stats_path)
    if isinstance(stats, dict):
      stats = (stats.get("mean", stats.get("clip_mean")), stats.get("std", stats.get("clip_std")))
    if not isinstance(stats, (tuple, list)) or len(stats) != 2 or any(s is None for s in stats):
      raise ValueError(f"{stats_path}: expected (mean, std) CLIP statistics")
  return model_cfg, karlo_to_params(state, model_cfg, stats)

