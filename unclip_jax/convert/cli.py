"""`python -m unclip_jax.convert <subcommand>`: PyTorch checkpoints <-> unclip_jax bundles (see bundle.py).

  karlo-diffusers SRC_DIR OUT_BUNDLE      diffusers Karlo folder (prior, text_proj, decoder, super_res_first,
                                          super_res_last, text_encoder [, image_encoder]), read per component
  hf-clip SRC_DIR OUT_BUNDLE              transformers CLIP folder -> the clip component
  karlo-original [--prior X --clip-stats S] [--decoder Y] [--sr Z] [--clip-dir D] OUT_BUNDLE
                                          Kakao Brain's Lightning .ckpt files (torch.load(weights_only=True))
  glide SRC OUT_BUNDLE                    GLIDE base / base-inpaint .pt -> decoder (UNet trunk + text encoder)
  from-training --workdir W --component NAME OUT_BUNDLE   EMA params of the latest training checkpoint
  to-diffusers BUNDLE OUT_DIR             one diffusers/transformers folder per component + model_index.json
  to-safetensors BUNDLE OUT_DIR           <component>.safetensors in the PyTorch key layouts

Every conversion prints, per component, the tensors converted, the parameter count and the unmatched keys. The
converters check every key against the model built from the config: a missing, unexpected or mis-shaped key is an
error naming it, never a silent skip. Non-parameter buffers some files carry (`position_ids`, Karlo's
`causal_mask`/`cf_token`/`cf_mask`) are listed as ignored.

Sizes come from the source files (config.json, or tensor shapes for GLIDE); stage settings (diffusion, sampling,
training fields) from the built-in `configs/<stage>.py` variants: karlo for the prior (25 steps, guidance 4, x̂0 clamp 5) and
the decoder (25 steps, guidance 8), karlo_64_256 for super-res (7 steps), vit_l14 for CLIP, glide for GLIDE.
A diffusers `scheduler_config.json` next to a component overrides the schedule fields it sets. Karlo imports set
`null_text="empty_prompt"` on the prior and decoder: Karlo trained, and diffusers samples, the unconditional branch
with the CLIP encoding of "".
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import sys
from typing import Any, Mapping, Sequence

import ml_collections as mlc
import numpy as np

from unclip_jax import bundle, config_lib, paths
from unclip_jax.convert import clip as convert_clip, prior as convert_prior, unet as convert_unet
from unclip_jax.convert import torch_layout as tl
from unclip_jax.stages import builders

KARLO_FOLDERS = ("prior", "text_proj", "decoder", "super_res_first", "super_res_last", "text_encoder",
                 "image_encoder")
_BUFFERS = re.compile(r"(^|\.)(position_ids|causal_mask|cf_token|cf_mask)$")
_PREDICTIONS = {"epsilon": "eps", "sample": "x0"}
_VARIANCES = ("fixed_small_log", "learned_range")


@dataclasses.dataclass
class Report:
  """What one component's conversion did (printed by `print_summary`)."""
  component: str
  source_tensors: int           # tensors read from (or written to) the PyTorch side
  tensors: int                  # tensors in our param tree
  params: int
  ignored: list[str] = dataclasses.field(default_factory=list)     # non-parameter buffers dropped
  unmatched: list[str] = dataclasses.field(default_factory=list)   # always empty on success (errors otherwise)
  note: str = ""


def print_summary(reports: Sequence[Report], out=None) -> None:
  out = out or sys.stdout
  print(f"{'component':<18}{'torch tensors':>14}{'tensors':>9}{'params':>16}  unmatched keys", file=out)
  for r in reports:
    unmatched = ", ".join(r.unmatched) if r.unmatched else "none"
    print(f"{r.component:<18}{r.source_tensors:>14}{r.tensors:>9}{r.params:>16,}  {unmatched}", file=out)
    if r.ignored:
      print(f"{'':<18}ignored buffers ({len(r.ignored)}): {', '.join(r.ignored[:5])}"
            f"{' ...' if len(r.ignored) > 5 else ''}", file=out)
    if r.note:
      print(f"{'':<18}{r.note}", file=out)


def _report(name: str, source: Mapping[str, Any] | int, params, note: str = "") -> Report:
  keys = list(source) if isinstance(source, Mapping) else []
  ignored = [k for k in keys if _BUFFERS.search(k)]
  n_source = len(keys) - len(ignored) if isinstance(source, Mapping) else int(source)
  return Report(name, n_source, len(bundle.flatten_params(params)), bundle.param_count(params), ignored, [], note)


# ---- stage configs ----------------------------------------------------------------------------------------------
def stage_config(spec: str) -> mlc.ConfigDict:
  """'prior.py:karlo' / 'prior:karlo' (a built-in config) or 'path/to/x.py:variant' -> an unlocked ConfigDict."""
  return mlc.ConfigDict(config_lib.load_config(spec).to_dict())


def _with_model(cfg: mlc.ConfigDict, **fields) -> mlc.ConfigDict:
  """cfg with `model` updated (new keys allowed)."""
  model = cfg.model.to_dict()
  model.update(fields)
  cfg.model = mlc.ConfigDict(model)
  return cfg


def _apply_scheduler(cfg: mlc.ConfigDict, folder: pathlib.Path) -> str:
  """Applies a diffusers UnCLIPScheduler `scheduler_config.json` (if present) to cfg.diffusion / cfg.sampling."""
  path = folder / "scheduler_config.json"
  if not path.is_file():
    return ""
  d = bundle.read_json(path, "scheduler config")
  if d.get("_class_name", "UnCLIPScheduler") != "UnCLIPScheduler":
    raise ValueError(f"{path}: only UnCLIPScheduler configs are understood, got {d.get('_class_name')!r}")
  if d.get("beta_schedule", "squaredcos_cap_v2") != "squaredcos_cap_v2":
    raise ValueError(f"{path}: beta_schedule {d['beta_schedule']!r} is not supported (only squaredcos_cap_v2)")
  variance, prediction = d.get("variance_type", "fixed_small_log"), d.get("prediction_type", "epsilon")
  if variance not in _VARIANCES or prediction not in _PREDICTIONS:
    raise ValueError(f"{path}: variance_type {variance!r} / prediction_type {prediction!r} not supported")
  cfg.diffusion.update(schedule="cosine", timesteps=int(d.get("num_train_timesteps", 1000)), variance=variance,
                       prediction=_PREDICTIONS[prediction])
  cfg.sampling.update(clip_denoised=bool(d.get("clip_sample", True)),
                      clip_range=float(d.get("clip_sample_range", 1.0)))
  return f"schedule from {folder.name}/scheduler_config.json"


def scheduler_config(cfg) -> dict[str, Any] | None:
  """Our diffusion/sampling blocks -> a diffusers UnCLIPScheduler config (None when it cannot express them)."""
  d, s = cfg.diffusion, cfg.sampling
  inverse = {v: k for k, v in _PREDICTIONS.items()}
  if d.schedule != "cosine" or d.variance not in _VARIANCES or d.prediction not in inverse:
    return None
  return {"_class_name": "UnCLIPScheduler", "_diffusers_version": tl.DIFFUSERS_VERSION,
          "num_train_timesteps": int(d.timesteps), "variance_type": d.variance,
          "prediction_type": inverse[d.prediction], "clip_sample": bool(s.clip_denoised),
          "clip_sample_range": float(s.clip_range), "beta_schedule": "squaredcos_cap_v2"}


def _clip_stage(clip_cfg, base: str = "clip.py:vit_l14") -> mlc.ConfigDict:
  block = convert_clip.model_block_from_config(clip_cfg)
  cfg = stage_config(base)
  return _with_model(cfg, **block)


# ---- readers ----------------------------------------------------------------------------------------------------
def _need_dir(path, what: str) -> pathlib.Path:
  path = paths.as_path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"{what} not found: {path}")
  return path


def _read_hf_clip(folder: pathlib.Path):
  """transformers CLIP folder -> (CLIPConfig, state dict)."""
  cfg = convert_clip.config_from_hf(convert_clip.read_hf_config(os.fspath(folder)))
  for name in (convert_clip.SAFETENSORS_NAME, convert_clip.TORCH_NAME):
    if (folder / name).is_file():
      return cfg, convert_clip.read_state_dict(os.fspath(folder / name))
  raise FileNotFoundError(f"no {convert_clip.SAFETENSORS_NAME} or {convert_clip.TORCH_NAME} in {folder}")


def _clip_component(text_dir: pathlib.Path | None, vision_dir: pathlib.Path | None = None):
  """One clip component from a text and/or a vision folder (Karlo's text_encoder + image_encoder).

  Returns (CLIPConfig, params, the source state dicts merged with folder-name prefixes, for the report).
  """
  dirs = [d for d in (text_dir, vision_dir) if d is not None]
  parts = [_read_hf_clip(d) for d in dirs]
  source = {f"{d.name}/{k}": v for d, (_, state) in zip(dirs, parts) for k, v in state.items()}
  if len(parts) == 1:
    cfg, state = parts[0]
  else:
    (tc, ts), (vc, vs) = parts
    if tc.text is None or vc.vision is None:
      raise ValueError(f"{text_dir} must hold a CLIP text model and {vision_dir} a CLIP vision model")
    if tc.projection_dim != vc.projection_dim:
      raise ValueError(f"text projection_dim {tc.projection_dim} != image projection_dim {vc.projection_dim}: "
                       "one clip component needs one embedding width")
    from unclip_jax.models import clip as clip_lib

    cfg = clip_lib.CLIPConfig(text=tc.text, vision=vc.vision, projection_dim=tc.projection_dim, logit_scale=False)
    state = {**convert_clip.add_tower_prefix(ts, tc), **convert_clip.add_tower_prefix(vs, vc)}
  return cfg, convert_clip.params_from_state_dict(state, cfg), source


# ---- karlo-diffusers --------------------------------------------------------------------------------------------
def import_karlo_diffusers(src, out, *, dtype: str | None = None) -> list[Report]:
  """diffusers Karlo folder -> bundle (components read one by one; model_index.json is not used)."""
  src = _need_dir(src, "Karlo diffusers folder")
  present = {n for n in KARLO_FOLDERS if (src / n).is_dir()}
  required = ["text_encoder", "text_proj", "decoder", "super_res_first", "super_res_last"]
  if "image_encoder" not in present:
    required.insert(0, "prior")
  missing = [n for n in required if n not in present]
  if missing:
    raise FileNotFoundError(f"{src}: missing component folder(s) {missing}; a diffusers Karlo folder has "
                            f"{list(KARLO_FOLDERS[:-1])} (+ image_encoder)")
  items, reports = [], []

  clip_cfg, clip_params, state = _clip_component(src / "text_encoder",
                                                 src / "image_encoder" if "image_encoder" in present else None)
  cfg = _clip_stage(clip_cfg)
  items.append(("clip", cfg, clip_params))
  reports.append(_report("clip", state, clip_params, "text_encoder" + (" + image_encoder" if
                                                                        "image_encoder" in present else "")))

  if "prior" in present:
    block, state = tl.read_diffusers_folder(src / "prior", "prior", convert_prior.model_config_from_diffusers)
    params = convert_prior.diffusers_to_params(state, block)
    cfg = _with_model(stage_config("prior.py:karlo"), **block.to_dict())
    cfg.null_text = "empty_prompt"     # Karlo and diffusers' pipeline: the uncond branches see CLIP("")
    note = _apply_scheduler(cfg, src / "prior_scheduler")
    items.append(("prior", cfg, params))
    reports.append(_report("prior", state, params, note))

  unet_block, ustate = tl.read_diffusers_folder(src / "decoder", "decoder", convert_unet.unet_config_from_diffusers)
  tp_block, tstate = tl.read_diffusers_folder(src / "text_proj", "text_proj",
                                              convert_unet.text_proj_config_from_diffusers)
  decoder_cfg = cfg = _decoder_stage(unet_block, tp_block, "decoder.py:karlo")
  params = {"unet": convert_unet.diffusers_to_unet_params(ustate, cfg.model),
            "text_proj": convert_unet.diffusers_to_text_proj_params(tstate, cfg.model)}
  cfg.null_text = "empty_prompt"
  note = _apply_scheduler(cfg, src / "decoder_scheduler")
  items.append(("decoder", cfg, params))
  reports.append(_report("decoder", {**{f"decoder.{k}": v for k, v in ustate.items()},
                                     **{f"text_proj.{k}": v for k, v in tstate.items()}}, params,
                         "decoder + text_proj" + (f"; {note}" if note else "")))

  first_size = None
  for name in ("super_res_first", "super_res_last"):
    block, state = tl.read_diffusers_folder(src / name, name, convert_unet.unet_config_from_diffusers)
    first_size = first_size or block.image_size
    cfg = _upsampler_stage(block, "upsampler.py:karlo_64_256", image_size=block.image_size or first_size,
                           low_res_size=decoder_cfg.model.image_size)
    params = convert_unet.diffusers_to_unet_params(state, cfg.model)
    note = _apply_scheduler(cfg, src / "super_res_scheduler")
    items.append((name, cfg, params))
    reports.append(_report(name, state, params, note))
  _check_consistent({name: cfg for name, cfg, _ in items})
  _write_bundle(out, items, f"karlo-diffusers:{src}", dtype)
  return reports


def _decoder_stage(unet_block, tp_block, base: str) -> mlc.ConfigDict:
  chans = tuple(unet_block.block_out_channels)
  if tp_block.time_embed_dim != 4 * chans[0]:
    raise ValueError(f"text_proj time_embed_dim {tp_block.time_embed_dim} must be 4·block_out_channels[0] = "
                     f"{4 * chans[0]} (the decoder's time embedding)")
  if tp_block.cross_attention_dim != unet_block.cross_attention_dim:
    raise ValueError(f"text_proj cross_attention_dim {tp_block.cross_attention_dim} != decoder "
                     f"cross_attention_dim {unet_block.cross_attention_dim}")
  return _with_model(stage_config(base), **unet_block.to_dict(), clip_embedding_dim=tp_block.clip_embeddings_dim,
                     clip_extra_context_tokens=tp_block.clip_extra_context_tokens, text_encoder="text_proj")


def _upsampler_stage(unet_block, base: str, *, image_size, low_res_size) -> mlc.ConfigDict:
  block = unet_block.to_dict()
  block.update(image_size=image_size, low_res_size=low_res_size)
  return _with_model(stage_config(base), **block)


def _check_consistent(cfgs: Mapping[str, mlc.ConfigDict]) -> None:
  """The widths the pipeline chains must agree: CLIP's projection = the prior's and decoder's embedding width, and
  CLIP's context length = the prior's text tokens."""
  widths, lengths = {}, {}
  if "clip" in cfgs and cfgs["clip"].model.text is not None:
    widths["clip projection_dim"] = cfgs["clip"].model.projection_dim
    lengths["clip context_length"] = cfgs["clip"].model.text.context_length
  if "prior" in cfgs:
    widths["prior embedding_dim"] = cfgs["prior"].model.embedding_dim
    lengths["prior num_embeddings"] = cfgs["prior"].model.num_embeddings
  if "decoder" in cfgs and cfgs["decoder"].model.text_encoder == "text_proj":
    widths["decoder clip_embedding_dim"] = cfgs["decoder"].model.clip_embedding_dim
  for what in (widths, lengths):
    if len(set(what.values())) > 1:
      raise ValueError(f"components disagree: {what}")


def _write_bundle(out, items, source: str, dtype: str | None) -> None:
  for name, cfg, params in items:
    bundle.save_component(out, name, cfg, params, dtype=dtype)
  old = bundle.read_manifest_or_none(paths.as_path(out)) or {}
  previous = old.get("source", "")
  bundle.write_manifest(out, source=source if not previous or previous == source else f"{previous}; {source}")


# ---- hf-clip ----------------------------------------------------------------------------------------------------
def import_hf_clip(src, out, *, dtype: str | None = None, base: str = "clip.py:vit_l14") -> list[Report]:
  src = _need_dir(src, "transformers CLIP folder")
  clip_cfg, params, state = _clip_component(src)
  _write_bundle(out, [("clip", _clip_stage(clip_cfg, base), params)], f"hf-clip:{src}", dtype)
  return [_report("clip", state, params, convert_clip.architecture_from_config(clip_cfg))]


# ---- karlo-original ---------------------------------------------------------------------------------------------
def _clip_stats(path) -> tuple[Any, Any]:
  stats = tl.load_torch_file(path)
  if isinstance(stats, dict):
    stats = (stats.get("mean", stats.get("clip_mean")), stats.get("std", stats.get("clip_std")))
  if not isinstance(stats, (tuple, list)) or len(stats) != 2 or any(s is None for s in stats):
    raise ValueError(f"{path}: expected (mean, std) CLIP statistics (Karlo's ViT-L-14_stats.th)")
  return tuple(stats)


def import_karlo_original(out, *, prior=None, clip_stats=None, decoder=None, sr=None, clip_dir=None,
                          prior_config: str = "prior.py:karlo", decoder_config: str = "decoder.py:karlo",
                          sr_config: str = "upsampler.py:karlo_64_256", clip_config: str = "clip.py:vit_l14",
                          dtype: str | None = None) -> list[Report]:
  """Original Karlo `.ckpt` files (+ an HF CLIP folder) -> bundle; sizes from the given stage configs."""
  if not any((prior, decoder, sr, clip_dir)):
    raise ValueError("karlo-original: give at least one of --prior, --decoder, --sr, --clip-dir")
  items, reports = [], []
  if clip_dir is not None:
    clip_cfg, params, state = _clip_component(_need_dir(clip_dir, "CLIP folder"))
    items.append(("clip", _clip_stage(clip_cfg, clip_config), params))
    reports.append(_report("clip", state, params, convert_clip.architecture_from_config(clip_cfg)))
  if prior is not None:
    cfg = stage_config(prior_config)
    cfg.null_text = "empty_prompt"
    state = tl.load_torch_state(prior)
    params = convert_prior.karlo_to_params(state, cfg.model, None if clip_stats is None else _clip_stats(clip_stats))
    items.append(("prior", cfg, params))
    reports.append(_report("prior", state, params, "+ CLIP stats" if clip_stats else "CLIP stats from the ckpt"))
  if decoder is not None:
    cfg = stage_config(decoder_config)
    cfg.null_text = "empty_prompt"
    state = tl.load_torch_state(decoder)
    unet_params, tp_params = convert_unet.karlo_decoder_to_params(state, cfg.model, cfg.model)
    params = {"unet": unet_params, "text_proj": tp_params}
    items.append(("decoder", cfg, params))
    reports.append(_report("decoder", state, params, "PLMImUNet -> unet + text_proj"))
  if sr is not None:
    cfg = stage_config(sr_config)
    state = tl.load_torch_state(sr)
    converted = convert_unet.karlo_sr_to_params(state, cfg.model)
    for prefix, name in convert_unet.KARLO_SR_MODELS:
      sub = {k: v for k, v in state.items() if k.removeprefix(convert_unet.KARLO_PREFIX).startswith(prefix)}
      items.append((name, stage_config(sr_config), converted[name]))
      reports.append(_report(name, sub, converted[name], prefix.rstrip(".")))
  _check_consistent({name: cfg for name, cfg, _ in items})
  _write_bundle(out, items, "karlo-original:" + ",".join(os.fspath(p) for p in (prior, decoder, sr, clip_dir) if p),
                dtype)
  return reports


# ---- glide ------------------------------------------------------------------------------------------------------
def import_glide(src, out, *, head_dim: int = 64, text_heads: int | None = None, norm_num_groups: int = 32,
                 base: str = "decoder.py:glide", dtype: str | None = None) -> list[Report]:
  """GLIDE base / base-inpaint checkpoint -> the decoder component (UNet trunk + GLIDE text encoder)."""
  from unclip_jax.convert import glide as convert_glide_text

  state = {k: tl.to_numpy(v, k) for k, v in tl.load_torch_state(src).items()}
  block = convert_glide_text.guided_unet_config(state, head_dim=head_dim, norm_num_groups=norm_num_groups)
  if block["conditioning"] not in ("none", "inpaint"):
    raise ValueError(f"{src}: a GLIDE upsampler (in_channels {block['in_channels']}) needs text conditioning in the "
                     "super-res stage, which bundle super-res components do not have; only base and base-inpaint "
                     "checkpoints convert")
  text = convert_glide_text.config_from_state_dict(state, heads=text_heads).to_dict()
  if text.pop("time_embed_dim") != 4 * block["block_out_channels"][0]:
    raise ValueError("GLIDE transformer_proj width != the UNet time embedding width (4·model_channels)")
  cfg = _with_model(stage_config(base), **block, **text)
  unet_params, text_params = convert_glide_text.glide_to_params(state, cfg.model)
  params = {"unet": unet_params, "text_encoder": text_params}
  _write_bundle(out, [("decoder", cfg, params)], f"glide:{src}", dtype)
  return [_report("decoder", state, params, f"GLIDE {block['conditioning']} trunk + text encoder")]


# ---- from-training ----------------------------------------------------------------------------------------------
def import_training(workdir, out, component: str, *, step: int | None = None, dtype: str | None = None,
                    which: str = "ema_params"):
  cfg, params = bundle.export_from_training(workdir, out, component, step=step, dtype=dtype, which=which)
  kind = "EMA params" if which == "ema_params" else "raw (non-EMA) params"
  return [_report(component, len(bundle.flatten_params(params)), params, f"{kind}, stage {cfg.stage}")]


# ---- exports ----------------------------------------------------------------------------------------------------
def _load_all(bundle_dir) -> dict[str, tuple[mlc.ConfigDict, Any]]:
  root = _need_dir(bundle_dir, "bundle")
  names = bundle.read_manifest(root)["components"]
  if not names:
    raise ValueError(f"bundle {root} has no components")
  return {name: bundle.load_component(root, name) for name in names}


def _looped(model_cfg):
  """A prior model block with scan_layers off: the converters read and write the looped tree."""
  if not model_cfg.scan_layers:
    return model_cfg
  return mlc.ConfigDict({**model_cfg.to_dict(), "scan_layers": False})


def _clip_parts(cfg, params):
  """A clip component -> [(folder, CLIPConfig, params)] for text_encoder / image_encoder."""
  from unclip_jax.models import clip as clip_lib

  c = builders.clip_config(cfg.model)
  out = []
  for folder, tower, proj, keep in (("text_encoder", "text_model", "text_projection", "text"),
                                    ("image_encoder", "vision_model", "visual_projection", "vision")):
    if getattr(c, keep) is None:
      continue
    sub = clip_lib.CLIPConfig(text=c.text if keep == "text" else None, vision=c.vision if keep == "vision" else None,
                              projection_dim=c.projection_dim, logit_scale=False, logit_scale_init=c.logit_scale_init,
                              attention=c.attention)
    p = {tower: params[tower], **({proj: params[proj]} if c.projection_dim is not None else {})}
    out.append((folder, sub, p))
  return out


def _write_json(path: pathlib.Path, d: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(d, f, indent=2, sort_keys=True)


def _write_tokenizer(folder: pathlib.Path, context_length: int) -> None:
  import transformers

  from unclip_jax.data import tokenizer

  vocab, merges = tokenizer.load_vocab_and_merges()
  tok = transformers.CLIPTokenizer(vocab=vocab, merges=merges, pad_token=tokenizer.PAD_TOKEN,
                                   model_max_length=context_length)
  tok.save_pretrained(os.fspath(folder))
  # The slow-tokenizer files too, which transformers 4.x's CLIPTokenizer (diffusers <= 0.37 stacks) reads.
  with open(folder / "vocab.json", "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(folder / "merges.txt", "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def export_diffusers(bundle_dir, out_dir) -> list[Report]:
  """Bundle -> diffusers component folders (+ model_index.json in the hub / diffusers 0.37 style: text_proj listed
  as ["unclip", "UnCLIPTextProjModel"])."""
  comps, out = _load_all(bundle_dir), pathlib.Path(out_dir)
  if "decoder" in comps and comps["decoder"][0].model.text_encoder != "text_proj":
    raise ValueError("the decoder uses the GLIDE text encoder, which has no diffusers class; use to-safetensors")
  index: dict[str, Any] = {}
  reports = []
  lib = {"text_encoder": "CLIPTextModelWithProjection", "image_encoder": "CLIPVisionModelWithProjection"}
  if "clip" in comps:
    cfg, params = comps["clip"]
    for folder, sub, p in _clip_parts(cfg, params):
      convert_clip.save_hf_clip(os.fspath(out / folder), p, sub)
      arch = convert_clip.architecture_from_config(sub)
      index[folder] = ["transformers", arch]
      reports.append(_report(f"clip/{folder}", convert_clip.state_dict_from_params(p, sub), p, arch))
      lib[folder] = arch
    text = cfg.model.text
    if text is not None and text.vocab_size == 49408:
      _write_tokenizer(out / "tokenizer", text.context_length)
      index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    elif text is not None:
      reports[-1].note += "; no tokenizer written (vocab_size is not the CLIP BPE's 49408)"
  if "prior" in comps:
    cfg, params = comps["prior"]
    convert_prior.save_diffusers(out / "prior", params, _looped(cfg.model))
    index["prior"] = ["diffusers", "PriorTransformer"]
    reports.append(_report("prior", convert_prior.params_to_diffusers(params, _looped(cfg.model)), params))
    _scheduler(out, "prior_scheduler", cfg, index, reports)
  if "decoder" in comps:
    cfg, params = comps["decoder"]
    convert_unet.save_diffusers_unet(out / "decoder", params["unet"], cfg.model)
    convert_unet.save_diffusers_text_proj(out / "text_proj", params["text_proj"], cfg.model)
    index["decoder"] = ["diffusers", convert_unet.diffusers_config_from_unet(cfg.model)["_class_name"]]
    index["text_proj"] = ["unclip", "UnCLIPTextProjModel"]        # the hub / diffusers <= 0.37 entry
    reports.append(_report("decoder", convert_unet.unet_params_to_diffusers(params["unet"], cfg.model),
                           params["unet"]))
    reports.append(_report("text_proj", convert_unet.text_proj_params_to_diffusers(params["text_proj"], cfg.model),
                           params["text_proj"]))
    _scheduler(out, "decoder_scheduler", cfg, index, reports)
  sr = [n for n in ("super_res_first", "super_res_last") if n in comps]
  for name in ("super_res_first", "super_res_last") if sr else ():
    cfg, params = comps[name if name in comps else sr[0]]
    convert_unet.save_diffusers_unet(out / name, params, cfg.model)
    index[name] = ["diffusers", convert_unet.diffusers_config_from_unet(cfg.model)["_class_name"]]
    note = "" if name in comps else f"copy of {sr[0]} (the bundle has one super-res model for every step)"
    reports.append(_report(name, convert_unet.unet_params_to_diffusers(params, cfg.model), params, note))
  if sr:
    _scheduler(out, "super_res_scheduler", comps[sr[0]][0], index, reports)
  variations = "prior" not in comps and "image_encoder" in index
  if variations:
    import transformers

    size = comps["clip"][0].model.vision.image_size
    transformers.CLIPImageProcessor(crop_size=size, size=size).save_pretrained(os.fspath(out / "feature_extractor"))
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
  elif "image_encoder" in index:
    del index["image_encoder"]            # written, but UnCLIPPipeline has no such component
  _write_json(out / "model_index.json", {"_class_name": "UnCLIPImageVariationPipeline" if variations else
                                         "UnCLIPPipeline", "_diffusers_version": tl.DIFFUSERS_VERSION, **index})
  return reports


def _scheduler(out: pathlib.Path, folder: str, cfg, index: dict, reports: list[Report]) -> None:
  sched = scheduler_config(cfg)
  if sched is None:
    reports[-1].note += f"; no {folder} (UnCLIPScheduler cannot express this diffusion config)"
    return
  _write_json(out / folder / "scheduler_config.json", sched)
  index[folder] = ["diffusers", "UnCLIPScheduler"]


def export_safetensors(bundle_dir, out_dir) -> list[Report]:
  """Bundle -> OUT_DIR/<name>.safetensors in the PyTorch key layouts (HF CLIP, diffusers, GLIDE)."""
  from safetensors.numpy import save_file

  comps, out = _load_all(bundle_dir), pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  files: list[tuple[str, dict, Any]] = []
  for name, (cfg, params) in comps.items():
    if name == "clip":
      from unclip_jax.models import clip as clip_lib

      files.append(("clip", convert_clip.state_dict_from_params(params, builders.clip_config(cfg.model)),
                    params))
    elif name == "prior":
      files.append(("prior", convert_prior.params_to_diffusers(params, _looped(cfg.model)), params))
    elif name == "decoder" and cfg.model.text_encoder == "glide":
      from unclip_jax.convert import glide as convert_glide_text

      files.append(("decoder", convert_glide_text.params_to_glide(params["unet"], params["text_encoder"], cfg.model),
                    params))
    elif name == "decoder":
      files.append(("decoder", convert_unet.unet_params_to_diffusers(params["unet"], cfg.model), params["unet"]))
      files.append(("text_proj", convert_unet.text_proj_params_to_diffusers(params["text_proj"], cfg.model),
                    params["text_proj"]))
    else:
      files.append((name, convert_unet.unet_params_to_diffusers(params, cfg.model), params))
  reports = []
  for name, state, params in files:
    save_file({k: np.array(v, np.float32, order="C") for k, v in state.items()},
              os.fspath(out / f"{name}.safetensors"), metadata={"format": "pt"})
    reports.append(_report(name, state, params, f"{name}.safetensors"))
  return reports


# ---- CLI --------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
  first, _, rest = __doc__.partition("\n\n")
  p = argparse.ArgumentParser(prog="python -m unclip_jax.convert", description=first, epilog=rest,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  dtype = dict(choices=bundle.DTYPES, default=None, help="storage dtype of the bundle params (default float32)")

  s = sub.add_parser("karlo-diffusers", help="diffusers Karlo folder -> bundle")
  s.add_argument("src")
  s.add_argument("out")
  s.add_argument("--dtype", **dtype)
  s.set_defaults(func=lambda a: import_karlo_diffusers(a.src, a.out, dtype=a.dtype))

  s = sub.add_parser("hf-clip", help="transformers CLIP folder -> bundle clip component")
  s.add_argument("src")
  s.add_argument("out")
  s.add_argument("--base-config", default="clip.py:vit_l14")
  s.add_argument("--dtype", **dtype)
  s.set_defaults(func=lambda a: import_hf_clip(a.src, a.out, dtype=a.dtype, base=a.base_config))

  s = sub.add_parser("karlo-original", help="original Karlo .ckpt files -> bundle")
  s.add_argument("out")
  s.add_argument("--prior")
  s.add_argument("--clip-stats", help="ViT-L-14_stats.th (mean, std) for the prior")
  s.add_argument("--decoder")
  s.add_argument("--sr")
  s.add_argument("--clip-dir", help="transformers CLIP folder for the clip component")
  s.add_argument("--prior-config", default="prior.py:karlo")
  s.add_argument("--decoder-config", default="decoder.py:karlo")
  s.add_argument("--sr-config", default="upsampler.py:karlo_64_256")
  s.add_argument("--clip-config", default="clip.py:vit_l14")
  s.add_argument("--dtype", **dtype)
  s.set_defaults(func=lambda a: import_karlo_original(
      a.out, prior=a.prior, clip_stats=a.clip_stats, decoder=a.decoder, sr=a.sr, clip_dir=a.clip_dir,
      prior_config=a.prior_config, decoder_config=a.decoder_config, sr_config=a.sr_config,
      clip_config=a.clip_config, dtype=a.dtype))

  s = sub.add_parser("glide", help="GLIDE base / base-inpaint .pt -> bundle decoder")
  s.add_argument("src")
  s.add_argument("out")
  s.add_argument("--head-dim", type=int, default=64, help="UNet attention head width (64 in every GLIDE model)")
  s.add_argument("--text-heads", type=int, default=None, help="text transformer heads (default width / 64)")
  s.add_argument("--norm-groups", type=int, default=32)
  s.add_argument("--base-config", default="decoder.py:glide")
  s.add_argument("--dtype", **dtype)
  s.set_defaults(func=lambda a: import_glide(a.src, a.out, head_dim=a.head_dim, text_heads=a.text_heads,
                                             norm_num_groups=a.norm_groups, base=a.base_config, dtype=a.dtype))

  s = sub.add_parser("from-training", help="EMA params of a training run -> bundle component")
  s.add_argument("out")
  s.add_argument("--workdir", required=True)
  s.add_argument("--component", required=True, choices=bundle.COMPONENTS)
  s.add_argument("--step", type=int, default=None)
  s.add_argument("--dtype", **dtype)
  s.add_argument("--params", choices=("ema", "raw"), default="ema",
                 help="the EMA weights (default) or the raw ones (a short run whose EMA has not caught up)")
  s.set_defaults(func=lambda a: import_training(a.workdir, a.out, a.component, step=a.step, dtype=a.dtype,
                                                which="ema_params" if a.params == "ema" else "params"))

  s = sub.add_parser("to-diffusers", help="bundle -> diffusers component folders")
  s.add_argument("bundle")
  s.add_argument("out")
  s.set_defaults(func=lambda a: export_diffusers(a.bundle, a.out))

  s = sub.add_parser("to-safetensors", help="bundle -> <component>.safetensors in PyTorch key layouts")
  s.add_argument("bundle")
  s.add_argument("out")
  s.set_defaults(func=lambda a: export_safetensors(a.bundle, a.out))
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """Runs one subcommand; prints the summary. Returns 0, or 1 after printing `error: ...` to stderr."""
  args = build_parser().parse_args(argv)
  try:
    out = getattr(args, "out", None)
    if out is not None and paths.is_remote(out):
      if args.command in ("to-diffusers", "to-safetensors"):
        raise ValueError(f"--out {out}: {args.command} writes local folders only; write locally, then copy")
      paths.check_reachable(out, "--out", write=True)          # before any weights are read
    reports = args.func(args)
  except (FileNotFoundError, ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print_summary(reports)
  print(f"{args.command}: wrote {getattr(args, 'out')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
