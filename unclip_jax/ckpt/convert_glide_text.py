"""GLIDE text-encoder weights (the non-UNet keys of a `Text2ImUNet` state dict) <-> `GlideTextEncoder` params.

Keys (ARCHITECTURE.md §10.2), exactly the remainder `convert_unet.glide_to_params` returns:
  token_embedding.weight (n_vocab, W)             -> token_embedding/embedding                 copy
  positional_embedding, padding_embedding (ctx, W) -> same names (raw parameters)             copy
  transformer.resblocks.{i}.ln_1 / ln_2 / final_ln  -> .../scale, .../bias                      copy
  transformer.resblocks.{i}.attn.c_qkv (3W, W), attn.c_proj, mlp.c_fc, mlp.c_proj, transformer_proj
                                                   -> .../kernel (.T), .../bias
`c_qkv` keeps GLIDE's per-head interleaved row order [q_h0, k_h0, v_h0, q_h1, ...] (§9.1): the module splits its
output per head (`glide_text.split_qkv`), so import and export are plain transposes. A missing, unexpected or
mis-shaped key raises a ValueError naming it. Whole-checkpoint helpers split a GLIDE file into UNet trunk
(`convert_unet`) and text encoder.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import ml_collections as mlc
import numpy as np

from unclip_jax.ckpt import convert_unet
from unclip_jax.ckpt import torch_layout as tl
from unclip_jax.ckpt.torch_layout import Params
from unclip_jax.models import glide_text

WHAT = "GLIDE text encoder"
_LAYOUT = tl.Layout(raw=("positional_embedding", "padding_embedding"), norms=("ln_1", "ln_2", "final_ln"),
                    indexed=("resblocks",))
_EMBED_KEY, _EMBED_PATH = "token_embedding.weight", ("token_embedding", "embedding")
GLIDE_HEAD_DIM = 64          # every released GLIDE text transformer: 512 wide, 8 heads


def _key_to_path(key: str) -> tuple[tuple[str, ...], str]:
  if key == _EMBED_KEY:
    return _EMBED_PATH, "copy"
  return tl.key_to_path(key, _LAYOUT, WHAT)


def _path_to_key(path: tuple[str, ...]) -> str:
  return _EMBED_KEY if path == _EMBED_PATH else tl.path_to_key(path, _LAYOUT)


def _torch_shape(shape: tuple[int, ...], path: tuple[str, ...]) -> tuple[int, ...]:
  return tuple(shape[::-1]) if path[-1] == "kernel" else tuple(shape)


def expected_shapes(cfg) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{param path: shape} of `GlideTextEncoder` built from `cfg` (glide_text.from_config)."""
  return tl.flat_shapes(glide_text.abstract_params(glide_text.from_config(cfg, dtype="float32", remat=False)))


def text_params_from_state_dict(state: Mapping[str, Any], cfg) -> Params:
  """GLIDE text-encoder state dict (numpy arrays or torch tensors, any float dtype) -> float32 params.

  Args:
    state: exactly the text-encoder keys (e.g. the remainder of `convert_unet.glide_to_params`).
    cfg: decoder model block / text block with the xf_* settings (see `glide_text.from_config`).
  Raises:
    ValueError naming an unexpected, mis-shaped or missing key, or a non-float tensor.
  """
  expected = expected_shapes(cfg)
  flat = {}
  for key, value in state.items():
    path, kind = _key_to_path(key)
    if path not in expected:
      raise ValueError(f"unexpected key {key!r} in the {WHAT} state dict (no parameter {'/'.join(path)})")
    arr = tl.to_flax(tl.to_numpy(value, key), kind, key)
    if arr.shape != expected[path]:
      raise ValueError(f"{key!r}: shape {_torch_shape(arr.shape, path)} does not match the model (expected "
                       f"{_torch_shape(expected[path], path)})")
    flat[path] = arr.astype(np.float32)
  missing = [_path_to_key(p) for p in expected if p not in flat]
  if missing:
    raise ValueError(f"the {WHAT} state dict is missing keys: {missing}")
  return tl.nest(flat)


def state_dict_from_text_params(params: Params, cfg=None) -> dict[str, np.ndarray]:
  """Inverse of `text_params_from_state_dict`: GLIDE key names, torch layouts, float32 numpy (c_qkv stays
  per-head interleaved). Checks the tree against `cfg` when given."""
  flat = tl.flatten(params, np.float32)
  if cfg is not None:
    tl.check_tree(flat, expected_shapes(cfg))
  return {_path_to_key(path): np.ascontiguousarray(tl.to_torch(arr, path)) for path, arr in flat.items()}


def config_from_state_dict(state: Mapping[str, Any], heads: int | None = None) -> mlc.ConfigDict:
  """Text settings inferred from a GLIDE text-encoder (or whole `Text2ImUNet`) state dict's shapes.

  Width, vocabulary, context, depth, final_ln / padding presence and xf_proj width come from the shapes; the
  head count cannot (c_qkv is (3W, W) for any split), so it is `heads` or W / 64 (GLIDE's head width).
  Returns a ConfigDict with text_ctx, xf_width, xf_layers, xf_heads, xf_final_ln, xf_padding, n_vocab and
  time_embed_dim, accepted by `glide_text.from_config`.
  """
  shape = lambda key: tuple(np.shape(state[key])) if key in state else None
  for key in (_EMBED_KEY, "positional_embedding", "transformer_proj.weight"):
    if key not in state:
      raise ValueError(f"{WHAT} state dict is missing key {key!r}")
  n_vocab, width = shape(_EMBED_KEY)
  ctx = shape("positional_embedding")[0]
  blocks = {int(m.group(1)) for k in state for m in [re.match(r"transformer\.resblocks\.(\d+)\.", k)] if m}
  if not blocks:
    raise ValueError(f"{WHAT} state dict has no 'transformer.resblocks.{{i}}.*' keys")
  if blocks != set(range(len(blocks))):
    raise ValueError(f"{WHAT} state dict has non-contiguous transformer.resblocks indices {sorted(blocks)}")
  if heads is None:
    if width % GLIDE_HEAD_DIM:
      raise ValueError(f"xf_width={width} is not a multiple of {GLIDE_HEAD_DIM}: pass heads= explicitly")
    heads = width // GLIDE_HEAD_DIM
  if width % heads:
    raise ValueError(f"xf_width={width} is not divisible by heads={heads}")
  return mlc.ConfigDict(dict(
      text_encoder="glide", text_ctx=int(ctx), xf_width=int(width), xf_layers=len(blocks), xf_heads=int(heads),
      xf_final_ln="final_ln.weight" in state, xf_padding="padding_embedding" in state, n_vocab=int(n_vocab),
      time_embed_dim=int(shape("transformer_proj.weight")[0])))


# ---- whole GLIDE checkpoints ------------------------------------------------------------------------------------
def glide_to_params(state: Mapping[str, Any], model_cfg) -> tuple[Params, Params]:
  """GLIDE `Text2ImUNet` (or variant) state dict -> (UNet trunk params, text-encoder params).

  `model_cfg` describes both (e.g. configs/decoder.py:glide `model`).
  """
  unet_params, rest = convert_unet.glide_to_params(state, model_cfg)
  return unet_params, text_params_from_state_dict(rest, model_cfg)


def params_to_glide(unet_params: Params, text_params: Params, model_cfg) -> dict[str, np.ndarray]:
  """(UNet trunk params, text-encoder params) -> one GLIDE state dict (float32 numpy)."""
  return {**convert_unet.params_to_glide(unet_params, model_cfg), **state_dict_from_text_params(text_params,
                                                                                              model_cfg)}


def load_glide(path, model_cfg) -> tuple[Params, Params]:
  """GLIDE `base.pt` / `base_inpaint.pt` / ... -> (UNet trunk params, text-encoder params)."""
  return glide_to_params(tl.load_torch_state(path), model_cfg)
