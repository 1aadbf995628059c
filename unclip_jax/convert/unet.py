"""PyTorch <-> unclip_jax weight conversion for the decoder/upsampler UNet and the unCLIP text projection.

Layouts (docs/layouts.md, "Text projection and UNet", "Karlo decoder", "GLIDE"):
  * diffusers `UNet2DConditionModel` (Karlo decoder, GLIDE trunk), `UNet2DModel` (Karlo super-res) and
    `UnCLIPTextProjModel`: folders with `config.json` + `diffusion_pytorch_model.safetensors` as `save_pretrained`
    writes them. Keys mirror our module names (`down_blocks.1.attentions.0.to_out.0.weight` ↔
    `down_blocks_1/attentions_0/to_out_0/kernel`); Linear weights are transposed, Conv2d weights go
    (O,I,kh,kw) -> (kh,kw,I,O), norm `weight` is `scale`.
  * original Karlo decoder / super-res and GLIDE UNets (guided-diffusion layout): `input_blocks` /
    `middle_block` / `output_blocks` index arithmetic, Conv1d attention weights with per-head interleaved `qkv`
    (rows [q_h0, k_h0, v_h0, q_h1, ...]) and `encoder_kv` ([k_h0, v_h0, k_h1, ...]), each `head_dim` long.
    These go through the diffusers state dict (`*_to_diffusers_state` / `diffusers_to_*_state`).

Every import checks names and shapes against `jax.eval_shape(init)` of the model built from the config: a missing,
unexpected or mis-shaped key raises a ValueError naming it. Missing files raise FileNotFoundError naming the path;
unreadable ones a ValueError naming it. diffusers folders are read with safetensors (no torch needed); `.ckpt`/`.pt`
files only with `torch.load(weights_only=True)`. The key rule, transposes, file I/O and head splitting are shared
with the prior converter (`torch_layout.py`); this file holds the UNet's names and the guided-diffusion mapping.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from unclip_jax.convert import torch_layout as tl
from unclip_jax.convert.torch_layout import (CONFIG_NAME, DIFFUSERS_VERSION, SAFETENSORS_NAME, Params,  # noqa: F401
                                          join_heads, load_torch_state, read_safetensors, split_heads)
from unclip_jax.models import text_proj as text_proj_lib
from unclip_jax.stages import builders

# One key rule for the UNet and the text projection (docs/layouts.md, "Naming").
_LAYOUT = tl.Layout(
    raw=("learned_classifier_free_guidance_embeddings",),
    norms=("norm1", "norm2", "group_norm", "conv_norm_out", "text_encoder_hidden_states_norm"),
    convs=("conv_in", "conv_out", "conv1", "conv2", "conv_shortcut"),
    indexed=("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers", "to_out"))

_DOWN_TYPES = {"ResnetDownsampleBlock2D": False, "SimpleCrossAttnDownBlock2D": True}
_UP_TYPES = {"ResnetUpsampleBlock2D": False, "SimpleCrossAttnUpBlock2D": True}
# diffusers options whose non-default values we do not implement (Karlo and GLIDE use these values).
_COND_FIXED = dict(act_fn="silu", norm_eps=1e-5, time_embedding_type="positional", conv_in_kernel=3,
                   conv_out_kernel=3, mid_block_scale_factor=1, resnet_out_scale_factor=1.0,
                   resnet_skip_time_act=False, time_embedding_act_fn=None, timestep_post_act=None,
                   time_cond_proj_dim=None, encoder_hid_dim=None, encoder_hid_dim_type=None, addition_embed_type=None,
                   num_class_embeds=None, class_embeddings_concat=False, only_cross_attention=False,
                   dual_cross_attention=False, cross_attention_norm=None, num_attention_heads=None,
                   projection_class_embeddings_input_dim=None, mid_block_only_cross_attention=None)
_PLAIN_FIXED = dict(act_fn="silu", norm_eps=1e-5, time_embedding_type="positional", mid_block_scale_factor=1,
                    add_attention=False, class_embed_type=None, num_class_embeds=None, mid_block_type="UNetMidBlock2D")


# ---- configs --------------------------------------------------------------------------------------------------
def conditioning_for(in_channels: int) -> str:
  for name in builders.CONDITIONINGS:
    if builders.input_channels(3, name) == in_channels:
      return name
  raise ValueError(f"in_channels={in_channels} matches no conditioning option {builders.CONDITIONINGS} "
                   f"(3, 6, 7 or 10 channels for RGB)")


def _check_fixed(config, fixed, cls):
  for key, default in fixed.items():
    value = config.get(key, default)
    if value != default and not (isinstance(default, float) and isinstance(value, (int, float))
                                 and float(value) == default):
      raise ValueError(f"{cls} option {key}={value!r} is not supported (only {default!r})")


def unet_config_from_diffusers(config: Mapping[str, Any]) -> mlc.ConfigDict:
  """diffusers `UNet2DConditionModel` / `UNet2DModel` config.json dict -> our UNet `model` block."""
  cls = config.get("_class_name")
  if cls not in ("UNet2DConditionModel", "UNet2DModel"):
    raise ValueError(f"config.json describes a {cls!r}, not a 'UNet2DConditionModel' or 'UNet2DModel'")
  down, up = list(config["down_block_types"]), list(config["up_block_types"])
  chans = tuple(int(c) for c in config["block_out_channels"])
  n = len(chans)
  if len(down) != n or len(up) != n:
    raise ValueError(f"{cls}: {len(down)} down / {len(up)} up block types for {n} block_out_channels")
  for t in down:
    if t not in _DOWN_TYPES:
      raise ValueError(f"{cls}: down block type {t!r} is not supported (only {sorted(_DOWN_TYPES)})")
  for t in up:
    if t not in _UP_TYPES:
      raise ValueError(f"{cls}: up block type {t!r} is not supported (only {sorted(_UP_TYPES)})")
  levels = tuple(_DOWN_TYPES[t] for t in down)
  if tuple(_UP_TYPES[t] for t in up) != levels[::-1]:
    raise ValueError(f"{cls}: up_block_types {up} must mirror down_block_types {down}")
  layers = config.get("layers_per_block", 2)
  if not isinstance(layers, int):
    raise ValueError(f"{cls}: per-level layers_per_block {layers} is not supported")
  head_dim = config.get("attention_head_dim", 8)
  if isinstance(head_dim, (list, tuple)):
    if len(set(head_dim)) != 1:
      raise ValueError(f"{cls}: per-level attention_head_dim {head_dim} is not supported")
    head_dim = head_dim[0]
  if cls == "UNet2DConditionModel":
    _check_fixed(config, _COND_FIXED, cls)
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DSimpleCrossAttn":
      raise ValueError(f"{cls}: mid_block_type {config.get('mid_block_type')!r} is not supported "
                       "(only 'UNetMidBlock2DSimpleCrossAttn')")
    class_embed = config.get("class_embed_type")
    if class_embed not in (None, "identity"):
      raise ValueError(f"{cls}: class_embed_type {class_embed!r} is not supported (only None or 'identity')")
    cross, mid_attention, shift = config.get("cross_attention_dim", 1280), True, config.get(
        "resnet_time_scale_shift", "default")
    if isinstance(cross, (list, tuple)):
      raise ValueError(f"{cls}: per-level cross_attention_dim {cross} is not supported")
  else:
    _check_fixed(config, _PLAIN_FIXED, cls)
    if any(levels):
      raise ValueError(f"{cls}: attention blocks are not supported")
    class_embed, cross, mid_attention = None, None, False
    shift = config.get("resnet_time_scale_shift", "default")
  temb = config.get("time_embedding_dim")
  if temb not in (None, 4 * chans[0]):
    raise ValueError(f"{cls}: time_embedding_dim={temb} is not supported (only None or {4 * chans[0]})")
  sample_size = config.get("sample_size")
  in_channels = int(config.get("in_channels", 4 if cls == "UNet2DConditionModel" else 3))
  return mlc.ConfigDict(dict(
      image_size=sample_size if isinstance(sample_size, int) else None,
      in_channels=in_channels, out_channels=int(config.get("out_channels", 3)),
      conditioning=conditioning_for(in_channels),
      block_out_channels=chans, layers_per_block=int(layers), attention_levels=levels,
      mid_block_attention=mid_attention, head_dim=int(head_dim) if head_dim is not None else 64,
      cross_attention_dim=cross, time_scale_shift=shift, class_embed_type=class_embed,
      norm_num_groups=int(config.get("norm_num_groups", 32)), dropout=float(config.get("dropout", 0.0)),
      flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)), freq_shift=float(config.get("freq_shift", 0)),
      center_input_sample=bool(config.get("center_input_sample", False)), time_embed_dim=None,
      attention="auto"))


def diffusers_config_from_unet(model_cfg) -> dict[str, Any]:
  """Our UNet `model` block -> diffusers config.json dict (`UNet2DConditionModel` when it has attention or a
  class embedding, else `UNet2DModel`)."""
  m = builders.unet(model_cfg)
  chans, levels = list(m.block_out_channels), list(m.attention_levels)
  down = [("SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D") for a in levels]
  up = [("SimpleCrossAttnUpBlock2D" if a else "ResnetUpsampleBlock2D") for a in levels[::-1]]
  freq_shift = int(m.freq_shift) if float(m.freq_shift).is_integer() else m.freq_shift
  common = {"_diffusers_version": DIFFUSERS_VERSION, "sample_size": model_cfg["image_size"],
            "in_channels": m.in_channels, "out_channels": m.out_channels,
            "center_input_sample": m.center_input_sample, "flip_sin_to_cos": m.flip_sin_to_cos,
            "freq_shift": freq_shift, "down_block_types": down, "up_block_types": up, "block_out_channels": chans,
            "layers_per_block": m.layers_per_block, "norm_num_groups": m.norm_num_groups, "norm_eps": 1e-5,
            "resnet_time_scale_shift": m.time_scale_shift, "act_fn": "silu", "dropout": m.dropout,
            "attention_head_dim": m.head_dim, "time_embedding_dim": None, "time_embedding_type": "positional",
            "downsample_padding": 1, "mid_block_scale_factor": 1}
  if m.has_attention or m.class_embed_type is not None:
    if not m.mid_block_attention:
      raise ValueError("UNet2DConditionModel export needs mid_block_attention=True (UNetMidBlock2DSimpleCrossAttn)")
    return {"_class_name": "UNet2DConditionModel", **common, "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
            "cross_attention_dim": m.cross_attention_dim, "class_embed_type": m.class_embed_type,
            "only_cross_attention": False, "dual_cross_attention": False, "upcast_attention": False,
            "use_linear_projection": False, "num_class_embeds": None}
  return {"_class_name": "UNet2DModel", **common, "mid_block_type": "UNetMidBlock2D", "add_attention": False,
          "class_embed_type": None, "num_class_embeds": None}


def text_proj_from_block(cfg, dtype=None) -> text_proj_lib.UnCLIPTextProj:
  """The text projection of a text-proj block (diffusers names: clip_embeddings_dim, time_embed_dim, ...) or of a
  decoder `model` block (clip_embedding_dim; time_embed_dim from the UNet)."""
  if "clip_embeddings_dim" in cfg:
    return text_proj_lib.UnCLIPTextProj(
        clip_embeddings_dim=int(cfg["clip_embeddings_dim"]), time_embed_dim=int(cfg["time_embed_dim"]),
        cross_attention_dim=int(cfg["cross_attention_dim"]),
        clip_extra_context_tokens=int(cfg["clip_extra_context_tokens"]), dtype=jnp.dtype(dtype or "float32"))
  return builders.text_proj(cfg, dtype=dtype)


def text_proj_config_from_diffusers(config: Mapping[str, Any]) -> mlc.ConfigDict:
  """diffusers `UnCLIPTextProjModel` config.json -> text-proj block (clip_embeddings_dim, time_embed_dim, ...)."""
  cls = config.get("_class_name", "UnCLIPTextProjModel")
  if cls != "UnCLIPTextProjModel":
    raise ValueError(f"config.json describes a {cls!r}, not an 'UnCLIPTextProjModel'")
  for key in ("time_embed_dim", "cross_attention_dim"):
    if config.get(key) is None:
      raise ValueError(f"UnCLIPTextProjModel config.json lacks the required {key!r}")
  return mlc.ConfigDict(dict(clip_embeddings_dim=int(config.get("clip_embeddings_dim", 768)),
                             time_embed_dim=int(config["time_embed_dim"]),
                             cross_attention_dim=int(config["cross_attention_dim"]),
                             clip_extra_context_tokens=int(config.get("clip_extra_context_tokens", 4))))


def diffusers_config_from_text_proj(cfg) -> dict[str, Any]:
  m = text_proj_from_block(cfg)
  return {"_class_name": "UnCLIPTextProjModel", "_diffusers_version": DIFFUSERS_VERSION,
          "clip_embeddings_dim": m.clip_embeddings_dim, "time_embed_dim": m.time_embed_dim,
          "cross_attention_dim": m.cross_attention_dim, "clip_extra_context_tokens": m.clip_extra_context_tokens}


# ---- diffusers state dicts ------------------------------------------------------------------------------------
def unet_expected_shapes(model_cfg):
  return tl.flat_shapes(builders.abstract(builders.init_unet, builders.unet(model_cfg)))


def text_proj_expected_shapes(cfg):
  return tl.flat_shapes(builders.abstract(builders.init_text_proj, text_proj_from_block(cfg)))


def diffusers_to_unet_params(state: Mapping[str, Any], model_cfg) -> Params:
  """diffusers UNet state dict (numpy or torch tensors) -> our float32 params, checked against eval_shape(init)."""
  return tl.state_to_params(state, unet_expected_shapes(model_cfg), _LAYOUT, "diffusers UNet")


def unet_params_to_diffusers(params: Params, model_cfg=None) -> dict[str, np.ndarray]:
  """Our UNet params -> diffusers state dict (float32 numpy). Checks the tree when model_cfg is given."""
  return tl.params_to_state(params, None if model_cfg is None else unet_expected_shapes(model_cfg), _LAYOUT)


def diffusers_to_text_proj_params(state: Mapping[str, Any], cfg) -> Params:
  return tl.state_to_params(state, text_proj_expected_shapes(cfg), _LAYOUT, "diffusers UnCLIPTextProjModel")


def text_proj_params_to_diffusers(params: Params, cfg=None) -> dict[str, np.ndarray]:
  return tl.params_to_state(params, None if cfg is None else text_proj_expected_shapes(cfg), _LAYOUT)


# ---- diffusers folders ----------------------------------------------------------------------------------------
def load_diffusers_unet(folder) -> tuple[mlc.ConfigDict, Params]:
  """Reads a diffusers `UNet2DConditionModel` / `UNet2DModel` folder -> (our UNet model block, params)."""
  model_cfg, state = tl.read_diffusers_folder(folder, "model", unet_config_from_diffusers)
  return model_cfg, diffusers_to_unet_params(state, model_cfg)


def save_diffusers_unet(folder, params: Params, model_cfg) -> None:
  """Writes a folder that `UNet2DConditionModel.from_pretrained` / `UNet2DModel.from_pretrained` loads."""
  tl.write_diffusers_folder(folder, diffusers_config_from_unet(model_cfg), unet_params_to_diffusers(params, model_cfg))


def load_diffusers_text_proj(folder) -> tuple[mlc.ConfigDict, Params]:
  """Reads a diffusers `UnCLIPTextProjModel` folder -> (text-proj block, params)."""
  cfg, state = tl.read_diffusers_folder(folder, "model", text_proj_config_from_diffusers)
  return cfg, diffusers_to_text_proj_params(state, cfg)


def save_diffusers_text_proj(folder, params: Params, cfg) -> None:
  """Writes a folder that `UnCLIPTextProjModel.from_pretrained` loads."""
  tl.write_diffusers_folder(folder, diffusers_config_from_text_proj(cfg), text_proj_params_to_diffusers(params, cfg))


# ---- original guided-diffusion layout (Karlo decoder / super-res, GLIDE) ---------------------------------------
_RES = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
        ("out_layers.0", "norm2"), ("out_layers.3", "conv2"))
_TOP = (("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
        ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out"))
_KARLO_TEXT_PROJ = (("text_seq_proj.0", "encoder_hidden_states_proj"),
                    ("text_seq_proj.1", "text_encoder_hidden_states_norm"),
                    ("clip_tok_proj", "clip_extra_context_tokens_proj"), ("text_feat_proj", "embedding_proj"),
                    ("clip_emb", "clip_image_embeddings_project_to_time_embeddings"))
_KARLO_IGNORED = ("cf_token", "cf_mask", "clip_mean", "clip_std")   # non-persistent buffers if present
KARLO_PREFIX = "model."


def guided_module_map(model_cfg) -> list[tuple[str, str, str]]:
  """(original module, diffusers module, kind) for every UNet module; kind in {'plain', 'res', 'attn'}
  (docs/layouts.md, "Karlo decoder")."""
  m = builders.unet(model_cfg)
  n, layers, att = m.num_levels, m.layers_per_block, tuple(m.attention_levels)
  out = [(o, d, "plain") for o, d in _TOP]
  k = 1
  for b in range(n):
    for j in range(layers):
      out.append((f"input_blocks.{k}.0", f"down_blocks.{b}.resnets.{j}", "res"))
      if att[b]:
        out.append((f"input_blocks.{k}.1", f"down_blocks.{b}.attentions.{j}", "attn"))
      k += 1
    if b < n - 1:
      out.append((f"input_blocks.{k}.0", f"down_blocks.{b}.downsamplers.0", "res"))
      k += 1
  out.append(("middle_block.0", "mid_block.resnets.0", "res"))
  if m.mid_block_attention:
    out += [("middle_block.1", "mid_block.attentions.0", "attn"), ("middle_block.2", "mid_block.resnets.1", "res")]
  else:
    out.append(("middle_block.1", "mid_block.resnets.1", "res"))
  k = 0
  for u in range(n):
    a = att[n - 1 - u]
    for j in range(layers + 1):
      out.append((f"output_blocks.{k}.0", f"up_blocks.{u}.resnets.{j}", "res"))
      if a:
        out.append((f"output_blocks.{k}.1", f"up_blocks.{u}.attentions.{j}", "attn"))
      if j == layers and u < n - 1:
        out.append((f"output_blocks.{k}.{2 if a else 1}", f"up_blocks.{u}.upsamplers.0", "res"))
      k += 1
  return out


def _leaf_pairs(orig: str, diff: str):
  return [(f"{orig}.{leaf}", f"{diff}.{leaf}") for leaf in ("weight", "bias")]


def guided_to_diffusers_state(state: Mapping[str, Any], model_cfg) -> tuple[dict[str, np.ndarray], dict]:
  """guided-diffusion UNet state dict (no prefix) -> (diffusers UNet state dict, unused original keys).

  Raises a ValueError naming a missing key. The caller decides whether leftovers are an error.
  """
  m = builders.unet(model_cfg)
  src = {k: tl.to_numpy(v, k) for k, v in state.items()}
  take, out = tl.Taker(src, "original UNet"), {}
  for orig, diff, kind in guided_module_map(model_cfg):
    if kind == "plain":
      for o, d in _leaf_pairs(orig, diff):
        out[d] = take(o)
    elif kind == "res":
      for o_mod, d_mod in _RES:
        for o, d in _leaf_pairs(f"{orig}.{o_mod}", f"{diff}.{d_mod}"):
          out[d] = take(o)
      if f"{orig}.skip_connection.weight" in src:
        for o, d in _leaf_pairs(f"{orig}.skip_connection", f"{diff}.conv_shortcut"):
          out[d] = take(o)
    else:
      heads = int(take(f"{orig}.norm.weight").shape[0]) // m.head_dim
      for o, d in _leaf_pairs(f"{orig}.norm", f"{diff}.group_norm"):
        out[d] = take(o)
      ws, bs = split_heads(_squeeze1d(take(f"{orig}.qkv.weight"), f"{orig}.qkv.weight"), take(f"{orig}.qkv.bias"),
                           heads, m.head_dim, 3)
      for name, w, b in zip(("to_q", "to_k", "to_v"), ws, bs):
        out[f"{diff}.{name}.weight"], out[f"{diff}.{name}.bias"] = w, b
      ws, bs = split_heads(_squeeze1d(take(f"{orig}.encoder_kv.weight"), f"{orig}.encoder_kv.weight"),
                           take(f"{orig}.encoder_kv.bias"), heads, m.head_dim, 2)
      for name, w, b in zip(("add_k_proj", "add_v_proj"), ws, bs):
        out[f"{diff}.{name}.weight"], out[f"{diff}.{name}.bias"] = w, b
      out[f"{diff}.to_out.0.weight"] = _squeeze1d(take(f"{orig}.proj_out.weight"), f"{orig}.proj_out.weight")
      out[f"{diff}.to_out.0.bias"] = take(f"{orig}.proj_out.bias")
  return out, take.unused()


def diffusers_to_guided_state(state: Mapping[str, np.ndarray], model_cfg) -> dict[str, np.ndarray]:
  """Inverse of `guided_to_diffusers_state` (attention weights re-interleaved, Conv1d axis added)."""
  m = builders.unet(model_cfg)
  out = {}
  for orig, diff, kind in guided_module_map(model_cfg):
    if kind == "plain":
      for o, d in _leaf_pairs(orig, diff):
        out[o] = state[d]
    elif kind == "res":
      for o_mod, d_mod in _RES:
        for o, d in _leaf_pairs(f"{orig}.{o_mod}", f"{diff}.{d_mod}"):
          out[o] = state[d]
      if f"{diff}.conv_shortcut.weight" in state:
        for o, d in _leaf_pairs(f"{orig}.skip_connection", f"{diff}.conv_shortcut"):
          out[o] = state[d]
    else:
      heads = state[f"{diff}.group_norm.weight"].shape[0] // m.head_dim
      for o, d in _leaf_pairs(f"{orig}.norm", f"{diff}.group_norm"):
        out[o] = state[d]
      w, b = join_heads([state[f"{diff}.to_{n}.weight"] for n in "qkv"], [state[f"{diff}.to_{n}.bias"] for n in "qkv"],
                        heads, m.head_dim)
      out[f"{orig}.qkv.weight"], out[f"{orig}.qkv.bias"] = w[:, :, None], b
      w, b = join_heads([state[f"{diff}.add_{n}_proj.weight"] for n in "kv"],
                        [state[f"{diff}.add_{n}_proj.bias"] for n in "kv"], heads, m.head_dim)
      out[f"{orig}.encoder_kv.weight"], out[f"{orig}.encoder_kv.bias"] = w[:, :, None], b
      out[f"{orig}.proj_out.weight"] = state[f"{diff}.to_out.0.weight"][:, :, None]
      out[f"{orig}.proj_out.bias"] = state[f"{diff}.to_out.0.bias"]
  return out


def _squeeze1d(w: np.ndarray, key: str) -> np.ndarray:
  if w.ndim == 3 and w.shape[-1] == 1:
    return w[:, :, 0]
  if w.ndim == 2:
    return w
  raise ValueError(f"{key!r}: expected a Conv1d weight (O, I, 1), got shape {w.shape}")


def _strip(state: Mapping[str, Any], prefix: str) -> dict:
  return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def karlo_decoder_to_params(state: Mapping[str, Any], unet_cfg, text_proj_cfg) -> tuple[Params, Params]:
  """Karlo decoder (`PLMImUNet`, `model.`-prefixed or not) -> (UNet params, text-proj params)."""
  unet_state, rest = guided_to_diffusers_state(_strip(state, KARLO_PREFIX), unet_cfg)
  tp = {}
  for orig, diff in _KARLO_TEXT_PROJ:
    for o, d in _leaf_pairs(orig, diff):
      if o not in rest:
        raise ValueError(f"Karlo decoder state dict is missing key {KARLO_PREFIX + o!r}")
      tp[d] = rest.pop(o)
  if "cf_param" not in rest:
    raise ValueError(f"Karlo decoder state dict is missing key {KARLO_PREFIX + 'cf_param'!r}")
  tp["learned_classifier_free_guidance_embeddings"] = rest.pop("cf_param")
  extra = sorted(k for k in rest if k not in _KARLO_IGNORED)
  if extra:
    raise ValueError(f"unexpected keys in the Karlo decoder state dict: {[KARLO_PREFIX + k for k in extra]}")
  return diffusers_to_unet_params(unet_state, unet_cfg), diffusers_to_text_proj_params(tp, text_proj_cfg)


def params_to_karlo_decoder(unet_params: Params, text_proj_params: Params, unet_cfg, text_proj_cfg):
  """(UNet params, text-proj params) -> Karlo decoder state dict (`model.`-prefixed, float32 numpy)."""
  out = diffusers_to_guided_state(unet_params_to_diffusers(unet_params, unet_cfg), unet_cfg)
  tp = text_proj_params_to_diffusers(text_proj_params, text_proj_cfg)
  for orig, diff in _KARLO_TEXT_PROJ:
    for o, d in _leaf_pairs(orig, diff):
      out[o] = tp[d]
  out["cf_param"] = tp["learned_classifier_free_guidance_embeddings"]
  return {KARLO_PREFIX + k: v for k, v in out.items()}


KARLO_SR_MODELS = (("model_first_steps.", "super_res_first"), ("model_last_step.", "super_res_last"))


def karlo_sr_to_params(state: Mapping[str, Any], unet_cfg) -> dict[str, Params]:
  """Karlo super-res `.ckpt` state dict -> {'super_res_first': params, 'super_res_last': params}
  (docs/layouts.md, "Karlo decoder")."""
  state = _strip(state, KARLO_PREFIX)
  out = {}
  for prefix, name in KARLO_SR_MODELS:
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not sub:
      raise ValueError(f"Karlo super-res state dict has no {prefix!r} keys")
    unet_state, rest = guided_to_diffusers_state(sub, unet_cfg)
    if rest:
      raise ValueError(f"unexpected keys in the Karlo super-res state dict: {[prefix + k for k in sorted(rest)]}")
    out[name] = diffusers_to_unet_params(unet_state, unet_cfg)
  other = sorted(k for k in state if not k.startswith(tuple(p for p, _ in KARLO_SR_MODELS)))
  if other:
    raise ValueError(f"unexpected keys in the Karlo super-res state dict: {other}")
  return out


def params_to_karlo_sr(first: Params, last: Params, unet_cfg) -> dict[str, np.ndarray]:
  out = {}
  for (prefix, _), params in zip(KARLO_SR_MODELS, (first, last)):
    for k, v in diffusers_to_guided_state(unet_params_to_diffusers(params, unet_cfg), unet_cfg).items():
      out[f"{KARLO_PREFIX}{prefix}{k}"] = v
  return out


def glide_to_params(state: Mapping[str, Any], unet_cfg) -> tuple[Params, dict[str, np.ndarray]]:
  """GLIDE `Text2ImUNet` (and variants) state dict -> (UNet trunk params, remaining keys).

  The remaining keys are the GLIDE text encoder (`token_embedding`, `positional_embedding`, `padding_embedding`,
  `transformer.*`, `final_ln`, `transformer_proj`), owned by the GLIDE text-encoder converter.
  """
  unet_state, rest = guided_to_diffusers_state(state, unet_cfg)
  return diffusers_to_unet_params(unet_state, unet_cfg), rest


def params_to_glide(unet_params: Params, unet_cfg) -> dict[str, np.ndarray]:
  """UNet trunk params -> GLIDE key layout (merge the text-encoder keys separately)."""
  return diffusers_to_guided_state(unet_params_to_diffusers(unet_params, unet_cfg), unet_cfg)


# ---- published Karlo sizes and file loaders -------------------------------------------------------------------
# Fields of a UNet block that the guided-diffusion checkpoints (Karlo, GLIDE) do not vary.
GUIDED_UNET_FIXED = dict(time_embed_dim=None, flip_sin_to_cos=True, freq_shift=0.0, center_input_sample=False,
                         dropout=0.0, attention="auto")
KARLO_DECODER = dict(image_size=64, conditioning="none", in_channels=3, out_channels=6,
                     block_out_channels=(320, 640, 960, 1280), layers_per_block=3,
                     attention_levels=(False, True, True, True), mid_block_attention=True, head_dim=64,
                     cross_attention_dim=1536, class_embed_type="identity", time_scale_shift="scale_shift",
                     norm_num_groups=32, **GUIDED_UNET_FIXED)                             # decoder_900M_vit_l.yaml
KARLO_TEXT_PROJ = dict(clip_embeddings_dim=768, time_embed_dim=1280, cross_attention_dim=1536,
                       clip_extra_context_tokens=4)
KARLO_SR = dict(image_size=256, conditioning="low_res", in_channels=6, out_channels=3,
                block_out_channels=(320, 640, 960, 1280), layers_per_block=3, attention_levels=(False,) * 4,
                mid_block_attention=False, head_dim=8, cross_attention_dim=None, class_embed_type=None,
                time_scale_shift="default", norm_num_groups=32, **GUIDED_UNET_FIXED)  # improved_sr_64_256_1.4B.yaml


def load_karlo_decoder(path, unet_cfg=None, text_proj_cfg=None):
  """Karlo `decoder-ckpt-step=...ckpt` -> (unet cfg, unet params, text-proj cfg, text-proj params)."""
  unet_cfg = mlc.ConfigDict(dict(unet_cfg or KARLO_DECODER))
  text_proj_cfg = mlc.ConfigDict(dict(text_proj_cfg or KARLO_TEXT_PROJ))
  unet_params, tp_params = karlo_decoder_to_params(load_torch_state(path), unet_cfg, text_proj_cfg)
  return unet_cfg, unet_params, text_proj_cfg, tp_params


def load_karlo_sr(path, unet_cfg=None):
  """Karlo `improved-sr-ckpt-step=1.2M.ckpt` -> (unet cfg, {'super_res_first': params, 'super_res_last': params})."""
  unet_cfg = mlc.ConfigDict(dict(unet_cfg or KARLO_SR))
  return unet_cfg, karlo_sr_to_params(load_torch_state(path), unet_cfg)


def load_glide(path, unet_cfg):
  """GLIDE `base.pt`/`upsample.pt`/... -> (UNet trunk params, text-encoder keys). `unet_cfg` must describe the
  trunk (e.g. configs/decoder.py:glide `model`; in_channels 7 for base_inpaint)."""
  return glide_to_params(load_torch_state(path), unet_cfg)
