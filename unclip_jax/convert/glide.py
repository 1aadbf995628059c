"""GLIDE text-encoder weights (the non-UNet keys of a `Text2ImUNet` state dict) <-> `GlideTextEncoder` params.

Keys (docs/layouts.md, "GLIDE"), exactly the remainder `convert_unet.glide_to_params` returns:
  token_embedding.weight (n_vocab, W)             -> token_embedding/embedding                 copy
  positional_embedding, padding_embedding (ctx, W) -> same names (raw parameters)             copy
  transformer.resblocks.{i}.ln_1 / ln_2 / final_ln  -> .../scale, .../bias                      copy
  transformer.resblocks.{i}.attn.c_qkv (3W, W), attn.c_proj, mlp.c_fc, mlp.c_proj, transformer_proj
                                                   -> .../kernel (.T), .../bias
`c_qkv` keeps GLIDE's per-head interleaved row order [q_h0, k_h0, v_h0, q_h1, ...] (docs/layouts.md, "Fused
projections"): the module splits its output per head (`glide_text.split_qkv`), so import and export are plain transposes. A missing, unexpected or
mis-shaped key raises a ValueError naming it. Whole-checkpoint helpers split a GLIDE file into UNet trunk
(`convert_unet`) and text encoder.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import ml_collections as mlc
import numpy as np

from unclip_jax.convert import unet as convert_unet
from unclip_jax.convert import torch_layout as tl
from unclip_jax.convert.torch_layout import Params
from unclip_jax.models import glide_text
from unclip_jax.stages import builders

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


def text_encoder(cfg) -> glide_text.GlideTextEncoder:
  """The text encoder of a text block (`config_from_state_dict`: xf_* fields, n_vocab, text_ctx, time_embed_dim)
  or of a decoder `model` block (time_embed_dim None -> 4·block_out_channels[0])."""
  if "block_out_channels" in cfg:
    return builders.glide_text(cfg)
  return glide_text.GlideTextEncoder(
      n_vocab=int(cfg["n_vocab"]), text_ctx=int(cfg["text_ctx"]), xf_width=int(cfg["xf_width"]),
      xf_layers=int(cfg["xf_layers"]), xf_heads=int(cfg["xf_heads"]), xf_final_ln=bool(cfg["xf_final_ln"]),
      xf_padding=bool(cfg["xf_padding"]), time_embed_dim=int(cfg["time_embed_dim"]))


def expected_shapes(cfg) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{param path: shape} of the `GlideTextEncoder` that `cfg` describes (see `text_encoder`)."""
  return tl.flat_shapes(builders.abstract(builders.init_glide_text, text_encoder(cfg)))


def text_params_from_state_dict(state: Mapping[str, Any], cfg) -> Params:
  """GLIDE text-encoder state dict (numpy arrays or torch tensors, any float dtype) -> float32 params.

  Args:
    state: exactly the text-encoder keys (e.g. the remainder of `convert_unet.glide_to_params`).
    cfg: decoder model block / text block with the xf_* settings (see `text_encoder`).
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
  time_embed_dim, accepted by `text_encoder`.
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


# ---- the UNet trunk's fields -----------------------------------------------------------------------------------
def guided_unet_config(state: Mapping[str, Any], *, head_dim: int = 64, norm_num_groups: int = 32) -> dict:
  """UNet model fields of a guided-diffusion (GLIDE) state dict, from its shapes.

  Levels are delimited by the upsampling ResBlock closing each output level; channels, attention, cross-attention
  width and the time-shift kind follow from tensor shapes. Head width and GroupNorm groups are not in the weights.
  """
  shape = lambda k: tuple(np.shape(state[k]))
  for key in ("input_blocks.0.0.weight", "out.2.weight", "time_embed.0.weight", "output_blocks.0.0.in_layers.0.weight"):
    if key not in state:
      raise ValueError(f"not a guided-diffusion UNet state dict: missing key {key!r}")
  c0, in_ch = shape("input_blocks.0.0.weight")[:2]
  levels, current, k = [], [], 0
  while f"output_blocks.{k}.0.in_layers.0.weight" in state:
    attn = f"output_blocks.{k}.1.qkv.weight" in state
    current.append((shape(f"output_blocks.{k}.0.out_layers.3.weight")[0], attn))
    if f"output_blocks.{k}.{2 if attn else 1}.in_layers.0.weight" in state:      # the level's upsampler
      levels.append(current)
      current = []
    k += 1
  levels.append(current)
  if len({len(level) for level in levels}) != 1 or len(levels[0]) < 1:
    raise ValueError(f"output blocks do not split into equal levels: {[len(level) for level in levels]}")
  chans, attention = tuple(level[0][0] for level in levels[::-1]), tuple(level[0][1] for level in levels[::-1])
  attn_keys = [key for key in state if key.endswith(".encoder_kv.weight")]
  temb = shape("time_embed.0.weight")[0]
  if temb != 4 * c0:
    raise ValueError(f"time embedding width {temb} != 4·model_channels ({4 * c0}): not supported")
  emb_rows = shape("input_blocks.1.0.emb_layers.1.weight")[0]
  return dict(in_channels=int(in_ch), out_channels=int(shape("out.2.weight")[0]),
              conditioning=convert_unet.conditioning_for(int(in_ch)), block_out_channels=tuple(map(int, chans)),
              layers_per_block=len(levels[0]) - 1, attention_levels=attention,
              mid_block_attention="middle_block.1.qkv.weight" in state, head_dim=head_dim,
              cross_attention_dim=int(shape(attn_keys[0])[1]) if attn_keys else None, class_embed_type="identity",
              time_scale_shift="scale_shift" if emb_rows == 2 * chans[0] else "default",
              norm_num_groups=norm_num_groups, **convert_unet.GUIDED_UNET_FIXED)
