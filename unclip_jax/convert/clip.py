"""HF transformers / OpenAI CLIP <-> unclip_jax CLIP weight conversion.

Layouts (docs/layouts.md, "CLIP"):
  * HF folders (`config.json` + `model.safetensors` or `pytorch_model.bin`) of `CLIPModel`,
    `CLIPTextModelWithProjection`, `CLIPVisionModelWithProjection` and bare `CLIPTextModel` / `CLIPVisionModel`.
    Tower keys are `text_model.` / `vision_model.`-prefixed, except bare towers saved by transformers >= 5.6 whose
    keys are unprefixed; both are accepted. `position_ids` buffers (old files) are ignored.
    Key <-> path: `text_model.encoder.layers.3.self_attn.q_proj.weight` <-> `text_model/encoder/layers_3/self_attn/
    q_proj/kernel`; Linear weights are transposed, Conv2d (O,I,kh,kw) -> (kh,kw,I,O), LayerNorm `weight` -> `scale`,
    Embedding `weight` -> `embedding`; `class_embedding` and `logit_scale` are copied.
  * OpenAI CLIP `state_dict` (ViT models): fused block-ordered `in_proj_weight` [Q;K;V] split with chunk(3).

Every import checks names and shapes against `jax.eval_shape(init)`: a missing, unexpected or mis-shaped key raises
a ValueError naming it. Export writes the prefixed hub layout (`model.safetensors` + `config.json`), which every
transformers version loads with `from_pretrained`.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any, Mapping

import jax
import numpy as np

from unclip_jax.models import clip as clip_lib
from unclip_jax.stages import builders

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
TORCH_NAME = "pytorch_model.bin"
TEXT_PREFIX, VISION_PREFIX = "text_model.", "vision_model."

# architectures -> (text tower, vision tower, projections, logit_scale)
ARCHITECTURES = {
    "CLIPModel": (True, True, True, True),
    "CLIPTextModelWithProjection": (True, False, True, False),
    "CLIPVisionModelWithProjection": (False, True, True, False),
    "CLIPTextModel": (True, False, False, False),
    "CLIPVisionModel": (False, True, False, False),
}
_MODEL_TYPE_DEFAULT = {"clip": "CLIPModel", "clip_text_model": "CLIPTextModel", "clip_vision_model": "CLIPVisionModel"}
_NORM_NAMES = ("layer_norm1", "layer_norm2", "final_layer_norm", "pre_layrnorm", "post_layernorm")
_EMBED_NAMES = ("token_embedding", "position_embedding")
_RAW = ("class_embedding", "logit_scale")
_IGNORED = re.compile(r"(^|\.)position_ids$")

Params = dict[str, Any]


# ---- config -------------------------------------------------------------------------------------------------
def _text_config(d: Mapping[str, Any]) -> clip_lib.TextConfig:
  return clip_lib.TextConfig(
      vocab_size=d.get("vocab_size", 49408), width=d.get("hidden_size", 512),
      layers=d.get("num_hidden_layers", 12), heads=d.get("num_attention_heads", 8),
      mlp_dim=d.get("intermediate_size", 2048), context_length=d.get("max_position_embeddings", 77),
      act=d.get("hidden_act", "quick_gelu"), eos_token_id=d.get("eos_token_id", 49407),
      layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)))


def _vision_config(d: Mapping[str, Any]) -> clip_lib.VisionConfig:
  return clip_lib.VisionConfig(
      image_size=d.get("image_size", 224), patch_size=d.get("patch_size", 32), width=d.get("hidden_size", 768),
      layers=d.get("num_hidden_layers", 12), heads=d.get("num_attention_heads", 12),
      mlp_dim=d.get("intermediate_size", 3072), act=d.get("hidden_act", "quick_gelu"),
      num_channels=d.get("num_channels", 3), layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)))


def architecture_of(hf_config: Mapping[str, Any]) -> str:
  """The HF class a config.json describes (`architectures[0]`, else the default class of its `model_type`)."""
  archs = hf_config.get("architectures") or []
  if archs:
    if archs[0] not in ARCHITECTURES:
      raise ValueError(f"unsupported architecture {archs[0]!r}; supported: {sorted(ARCHITECTURES)}")
    return archs[0]
  model_type = hf_config.get("model_type")
  if model_type not in _MODEL_TYPE_DEFAULT:
    raise ValueError(f"config.json has no 'architectures' and an unknown model_type {model_type!r}")
  return _MODEL_TYPE_DEFAULT[model_type]


def config_from_hf(hf_config: Mapping[str, Any], architecture: str | None = None) -> clip_lib.CLIPConfig:
  """HF config.json dict -> CLIPConfig (which towers/projections exist follows the architecture)."""
  arch = architecture or architecture_of(hf_config)
  has_text, has_vision, has_proj, has_scale = ARCHITECTURES[arch]
  model_type = hf_config.get("model_type", "clip")
  if model_type == "clip":
    text_d, vision_d = hf_config.get("text_config") or {}, hf_config.get("vision_config") or {}
  else:
    text_d = vision_d = hf_config
  return clip_lib.CLIPConfig(
      text=_text_config(text_d) if has_text else None,
      vision=_vision_config(vision_d) if has_vision else None,
      projection_dim=hf_config.get("projection_dim", 512) if has_proj else None,
      logit_scale=has_scale, logit_scale_init=float(hf_config.get("logit_scale_init_value", 2.6592)))


def model_block_from_config(cfg: clip_lib.CLIPConfig) -> dict[str, Any]:
  """CLIPConfig -> a `configs/clip.py`-style `model` dict (built by `stages.builders.clip`)."""
  text = None if cfg.text is None else dict(vocab_size=cfg.text.vocab_size, width=cfg.text.width,
                                            layers=cfg.text.layers, heads=cfg.text.heads, mlp_dim=cfg.text.mlp_dim,
                                            context_length=cfg.text.context_length, act=cfg.text.act,
                                            eos_token_id=cfg.text.eos_token_id, layer_norm_eps=cfg.text.layer_norm_eps)
  vision = None if cfg.vision is None else dict(
      image_size=cfg.vision.image_size, patch_size=cfg.vision.patch_size, width=cfg.vision.width,
      layers=cfg.vision.layers, heads=cfg.vision.heads, mlp_dim=cfg.vision.mlp_dim, act=cfg.vision.act,
      num_channels=cfg.vision.num_channels, layer_norm_eps=cfg.vision.layer_norm_eps)
  return dict(projection_dim=cfg.projection_dim, text=text, vision=vision, logit_scale=cfg.logit_scale,
              logit_scale_init=cfg.logit_scale_init, attention=cfg.attention)


def _hf_text_dict(t: clip_lib.TextConfig, projection_dim: int | None) -> dict[str, Any]:
  d = dict(vocab_size=t.vocab_size, hidden_size=t.width, num_hidden_layers=t.layers, num_attention_heads=t.heads,
           intermediate_size=t.mlp_dim, max_position_embeddings=t.context_length, hidden_act=t.act,
           eos_token_id=t.eos_token_id, layer_norm_eps=t.layer_norm_eps)
  if t.eos_token_id == clip_lib.LEGACY_EOS_TOKEN_ID:     # the published (legacy) OpenAI special ids
    d.update(bos_token_id=0, pad_token_id=1)
  if projection_dim is not None:
    d["projection_dim"] = projection_dim
  return d


def _hf_vision_dict(v: clip_lib.VisionConfig, projection_dim: int | None) -> dict[str, Any]:
  d = dict(image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.width, num_hidden_layers=v.layers,
           num_attention_heads=v.heads, intermediate_size=v.mlp_dim, hidden_act=v.act, num_channels=v.num_channels,
           layer_norm_eps=v.layer_norm_eps)
  if projection_dim is not None:
    d["projection_dim"] = projection_dim
  return d


def hf_config_from_config(cfg: clip_lib.CLIPConfig) -> dict[str, Any]:
  """CLIPConfig -> a complete HF config.json dict (built through the transformers config classes)."""
  import transformers  # a runtime dependency; imported lazily to keep `import unclip_jax` light

  arch = architecture_from_config(cfg)
  if arch == "CLIPModel":
    hf = transformers.CLIPConfig(text_config=_hf_text_dict(cfg.text, None),
                                 vision_config=_hf_vision_dict(cfg.vision, None),
                                 projection_dim=cfg.projection_dim, logit_scale_init_value=cfg.logit_scale_init)
  elif cfg.text is not None:
    hf = transformers.CLIPTextConfig(**_hf_text_dict(cfg.text, cfg.projection_dim))
  else:
    hf = transformers.CLIPVisionConfig(**_hf_vision_dict(cfg.vision, cfg.projection_dim))
  d = hf.to_dict()
  d["architectures"] = [arch]
  return d


def architecture_from_config(cfg: clip_lib.CLIPConfig) -> str:
  key = (cfg.text is not None, cfg.vision is not None, cfg.projection_dim is not None, cfg.logit_scale)
  for arch, parts in ARCHITECTURES.items():
    if parts == key:
      return arch
  raise ValueError(f"no HF CLIP class has exactly these parts (text, vision, projections, logit_scale) = {key}")


# ---- key <-> path ---------------------------------------------------------------------------------------------
def _module_path(parts: list[str]) -> tuple[str, ...]:
  """['encoder', 'layers', '3', 'self_attn'] -> ('encoder', 'layers_3', 'self_attn')."""
  out: list[str] = []
  for p in parts:
    if p.isdigit():
      if not out:
        raise ValueError(f"cannot map a key that starts with an index: {'.'.join(parts)!r}")
      out[-1] = f"{out[-1]}_{p}"
    else:
      out.append(p)
  return tuple(out)


def hf_key_to_path(key: str) -> tuple[tuple[str, ...], str]:
  """Prefixed HF key -> (Flax param path, transform kind in {'linear', 'conv', 'copy'})."""
  parts = key.split(".")
  if parts[-1] in _RAW:
    return _module_path(parts), "copy"
  *mod, leaf = parts
  name = mod[-1] if mod else ""
  if leaf == "bias":
    return _module_path(mod) + ("bias",), "copy"
  if leaf != "weight":
    raise ValueError(f"unexpected parameter name in key {key!r}")
  if name in _NORM_NAMES:
    return _module_path(mod) + ("scale",), "copy"
  if name in _EMBED_NAMES:
    return _module_path(mod) + ("embedding",), "copy"
  if name == "patch_embedding":
    return _module_path(mod) + ("kernel",), "conv"
  return _module_path(mod) + ("kernel",), "linear"


def path_to_hf_key(path: tuple[str, ...]) -> tuple[str, str]:
  """Flax param path -> (prefixed HF key, transform kind)."""
  parts = []
  for p in path:
    m = re.fullmatch(r"(.+)_(\d+)", p)
    parts.extend([m.group(1), m.group(2)] if m and m.group(1) == "layers" else [p])
  leaf, mod = parts[-1], parts[:-1]
  if leaf in _RAW:
    return ".".join(parts), "copy"
  name = mod[-1]
  if leaf == "bias" or leaf in ("scale", "embedding"):
    return ".".join(mod + ["weight" if leaf != "bias" else "bias"]), "copy"
  if leaf == "kernel":
    return ".".join(mod + ["weight"]), "conv" if name == "patch_embedding" else "linear"
  raise ValueError(f"cannot map param path {'/'.join(path)!r} to an HF key")


def _to_flax(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear":
    return x.T
  if kind == "conv":
    return x.transpose(2, 3, 1, 0)
  return x


def _to_torch(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear":
    return x.T
  if kind == "conv":
    return x.transpose(3, 2, 0, 1)
  return x


# ---- state dict <-> params ------------------------------------------------------------------------------------
def _abstract_flat(cfg: clip_lib.CLIPConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  abstract = builders.abstract(builders.init_clip, clip_lib.CLIP(cfg))
  return {tuple(k.key for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}


def add_tower_prefix(state_dict: Mapping[str, Any], cfg: clip_lib.CLIPConfig) -> dict[str, Any]:
  """Adds `text_model.`/`vision_model.` to unprefixed bare-tower keys (transformers >= 5.6); drops position_ids."""
  out = {}
  for key, value in state_dict.items():
    if _IGNORED.search(key):
      continue
    top = key.split(".", 1)[0]
    if top in ("embeddings", "encoder", "final_layer_norm", "pre_layrnorm", "post_layernorm"):
      if cfg.text is not None and cfg.vision is None:
        key = TEXT_PREFIX + key
      elif cfg.vision is not None and cfg.text is None:
        key = VISION_PREFIX + key
      else:
        raise ValueError(f"unprefixed tower key {key!r} in a two-tower checkpoint")
    out[key] = value
  return out


def _as_numpy(x: Any) -> np.ndarray:
  """torch tensor (from a .bin file) or array -> numpy; floating point (incl. bf16/fp16) -> float32."""
  if hasattr(x, "detach"):
    x = x.detach().float().numpy() if x.is_floating_point() else x.detach().numpy()
  x = np.asarray(x)
  return x.astype(np.float32) if x.dtype.kind == "f" or x.dtype.name == "bfloat16" else x


def params_from_state_dict(state_dict: Mapping[str, Any], cfg: clip_lib.CLIPConfig) -> Params:
  """HF CLIP state dict (prefixed or unprefixed keys, numpy or torch values) -> float32 Flax params.

  Raises:
    ValueError: naming every missing, unexpected or mis-shaped key.
  """
  expected = _abstract_flat(cfg)
  flat: dict[tuple[str, ...], np.ndarray] = {}
  errors: list[str] = []
  seen: set[tuple[str, ...]] = set()                  # paths present in the checkpoint (even if mis-shaped)
  for key, value in add_tower_prefix(state_dict, cfg).items():
    try:
      path, kind = hf_key_to_path(key)
    except ValueError as e:
      errors.append(str(e))
      continue
    if path not in expected:
      errors.append(f"unexpected key {key!r} (no parameter {'/'.join(path)})")
      continue
    seen.add(path)
    arr = _to_flax(_as_numpy(value), kind).astype(np.float32)
    if arr.shape != expected[path]:
      errors.append(f"shape mismatch for {key!r}: checkpoint {arr.shape} (as {'/'.join(path)}), "
                    f"model expects {expected[path]}")
      continue
    flat[path] = arr
  for path in expected:
    if path not in seen:
      errors.append(f"missing key {path_to_hf_key(path)[0]!r} (parameter {'/'.join(path)})")
  if errors:
    raise ValueError("CLIP checkpoint does not match the model:\n  " + "\n  ".join(errors))
  return _unflatten(flat)


def state_dict_from_params(params: Params, cfg: clip_lib.CLIPConfig) -> dict[str, np.ndarray]:
  """Flax params -> prefixed HF state dict (float32 numpy, contiguous). Shapes are checked against the model."""
  expected = _abstract_flat(cfg)
  flat = {tuple(k.key for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  missing = sorted("/".join(p) for p in expected if p not in flat)
  unexpected = sorted("/".join(p) for p in flat if p not in expected)
  bad = sorted(f"{'/'.join(p)}: {flat[p].shape} vs {expected[p]}" for p in flat
               if p in expected and flat[p].shape != expected[p])
  if missing or unexpected or bad:
    raise ValueError(f"params do not match the model: missing={missing} unexpected={unexpected} shapes={bad}")
  out = {}
  for path, arr in flat.items():
    key, kind = path_to_hf_key(path)
    out[key] = np.array(_to_torch(arr, kind), dtype=np.float32, order="C")   # keeps 0-d logit_scale 0-d
  return out


def _unflatten(flat: Mapping[tuple[str, ...], np.ndarray]) -> Params:
  tree: Params = {}
  for path, value in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return tree


# ---- files ----------------------------------------------------------------------------------------------------
def read_state_dict(path: str) -> dict[str, Any]:
  """Reads `model.safetensors` (numpy) or `pytorch_model.bin` (torch, weights_only=True).

  Raises FileNotFoundError / ValueError naming the path.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  try:
    if path.endswith(".safetensors"):
      from safetensors import safe_open

      out = {}
      with safe_open(path, framework="numpy") as f:
        for k in f.keys():
          try:
            out[k] = f.get_tensor(k)
          except TypeError:                  # bfloat16: numpy has no such dtype; read through jax (ml_dtypes)
            with safe_open(path, framework="flax") as fj:
              out[k] = np.asarray(fj.get_tensor(k))
      return out
    import torch  # only for legacy .bin files

    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - re-raised with the path
    raise ValueError(f"could not read checkpoint {path}: {type(e).__name__}: {e}") from e
  if not isinstance(sd, Mapping):
    raise ValueError(f"checkpoint {path} does not hold a state dict (got {type(sd).__name__})")
  return dict(sd)


def read_hf_config(directory: str) -> dict[str, Any]:
  """DIRECTORY/config.json; FileNotFoundError / ValueError naming the file when it is missing or corrupt."""
  from unclip_jax import bundle

  return bundle.read_json(pathlib.Path(directory) / CONFIG_NAME, "config file")


def load_hf_clip(directory: str) -> tuple[clip_lib.CLIPConfig, Params]:
  """Imports an HF CLIP folder (`save_pretrained` output of any of the five CLIP classes).

  Returns:
    (CLIPConfig, float32 params) for `clip_lib.CLIP(cfg)`.
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory not found: {directory}")
  cfg = config_from_hf(read_hf_config(directory))
  for name in (SAFETENSORS_NAME, TORCH_NAME):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return cfg, params_from_state_dict(read_state_dict(path), cfg)
  raise FileNotFoundError(f"no {SAFETENSORS_NAME} or {TORCH_NAME} in {directory}")


def save_hf_clip(directory: str, params: Params, cfg: clip_lib.CLIPConfig) -> None:
  """Writes `config.json` + `model.safetensors` in the prefixed hub layout (loads with `from_pretrained`)."""
  from safetensors.numpy import save_file

  sd = state_dict_from_params(params, cfg)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
    json.dump(hf_config_from_config(cfg), f, indent=2, sort_keys=True)
  save_file(sd, os.path.join(directory, SAFETENSORS_NAME), metadata={"format": "pt"})


# ---- OpenAI CLIP ------------------------------------------------------------------------------------------------
_OPENAI_LAYER = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_OPENAI_DROPPED = ("input_resolution", "context_length", "vocab_size")


def config_from_openai(state_dict: Mapping[str, Any], head_dim: int = 64) -> clip_lib.CLIPConfig:
  """Infers the CLIPConfig of an OpenAI ViT CLIP state dict from its shapes (OpenAI `build_model`).

  Heads are width // head_dim (64 in every published OpenAI model).
  """
  if "visual.proj" not in state_dict:
    raise ValueError("only OpenAI ViT CLIP checkpoints are supported (no 'visual.proj'; ModifiedResNet?)")
  shape = lambda k: tuple(_as_numpy(state_dict[k]).shape)
  count = lambda prefix: len({k[len(prefix):].split(".", 1)[0] for k in state_dict
                              if k.startswith(prefix) and k.endswith("attn.in_proj_weight")})
  vw, _, patch, _ = shape("visual.conv1.weight")
  grid = round((shape("visual.positional_embedding")[0] - 1) ** 0.5)
  tw = shape("ln_final.weight")[0]
  vision = clip_lib.VisionConfig(image_size=patch * grid, patch_size=patch, width=vw,
                                 layers=count("visual.transformer.resblocks."), heads=vw // head_dim, mlp_dim=4 * vw)
  text = clip_lib.TextConfig(vocab_size=shape("token_embedding.weight")[0], width=tw,
                             layers=count("transformer.resblocks."), heads=tw // head_dim, mlp_dim=4 * tw,
                             context_length=shape("positional_embedding")[0], eos_token_id=2)
  return clip_lib.CLIPConfig(text=text, vision=vision, projection_dim=shape("text_projection")[1], logit_scale=True)


def hf_state_dict_from_openai(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """OpenAI CLIP state dict -> prefixed HF `CLIPModel` state dict (docs/layouts.md, "CLIP")."""
  out: dict[str, np.ndarray] = {}
  for key, value in state_dict.items():
    x = _as_numpy(value)
    if key in _OPENAI_DROPPED:
      continue
    tower, rest = (VISION_PREFIX, key[len("visual."):]) if key.startswith("visual.") else (TEXT_PREFIX, key)
    m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias|in_proj_weight|in_proj_bias)", rest)
    if m:
      i, mod, leaf = m.groups()
      base = f"{tower}encoder.layers.{i}."
      if leaf.startswith("in_proj"):
        kind = leaf.split("_")[-1]
        for name, chunk in zip(("q_proj", "k_proj", "v_proj"), np.split(x, 3, axis=0)):   # block order [Q;K;V]
          out[f"{base}self_attn.{name}.{kind}"] = chunk
        continue
      if mod not in _OPENAI_LAYER:
        raise ValueError(f"unexpected OpenAI CLIP key {key!r}")
      out[f"{base}{_OPENAI_LAYER[mod]}.{leaf}"] = x
      continue
    simple = {
        "token_embedding.weight": TEXT_PREFIX + "embeddings.token_embedding.weight",
        "positional_embedding": TEXT_PREFIX + "embeddings.position_embedding.weight",
        "ln_final.weight": TEXT_PREFIX + "final_layer_norm.weight",
        "ln_final.bias": TEXT_PREFIX + "final_layer_norm.bias",
        "text_projection": "text_projection.weight",
        "logit_scale": "logit_scale",
        "visual.conv1.weight": VISION_PREFIX + "embeddings.patch_embedding.weight",
        "visual.class_embedding": VISION_PREFIX + "embeddings.class_embedding",
        "visual.positional_embedding": VISION_PREFIX + "embeddings.position_embedding.weight",
        "visual.ln_pre.weight": VISION_PREFIX + "pre_layrnorm.weight",
        "visual.ln_pre.bias": VISION_PREFIX + "pre_layrnorm.bias",
        "visual.ln_post.weight": VISION_PREFIX + "post_layernorm.weight",
        "visual.ln_post.bias": VISION_PREFIX + "post_layernorm.bias",
        "visual.proj": "visual_projection.weight",
    }
    if key not in simple:
      raise ValueError(f"unexpected OpenAI CLIP key {key!r}")
    out[simple[key]] = x.T if key in ("text_projection", "visual.proj") else x
  return out


def load_openai_clip(state_dict: Mapping[str, Any] | str) -> tuple[clip_lib.CLIPConfig, Params]:
  """OpenAI CLIP (ViT) state dict, or the path of a file holding one -> (CLIPConfig, float32 params).

  Files are read with `torch.load(weights_only=True)`: a plain `state_dict()` saved with `torch.save` loads; the
  TorchScript archives OpenAI publishes do not (convert them with `torch.jit.load(...).state_dict()` first, in a
  trusted environment). Names and shapes are checked.
  """
  if isinstance(state_dict, str):
    state_dict = read_state_dict(state_dict)
  cfg = config_from_openai(state_dict)
  return cfg, params_from_state_dict(hf_state_dict_from_openai(state_dict), cfg)
