"""Precompute CLIP embeddings once for an image-text dataset, so prior and decoder training never run CLIP.

  python -m unclip_jax.data.precompute --data DATASET_DIR --clip CLIP_SOURCE --out DIR [--name NAME]
      [--batch-size 64] [--overwrite]

CLIP_SOURCE is one of: a CLIP training workdir of ours (`checkpoints/` inside; EMA params), a bundle's `clip`
component folder (config.json + params.safetensors), or a transformers CLIP folder (config.json + weights).

Writes an embeddings dataset (DIR/embeddings/NAME/1.0.0) whose row i belongs to example i of DATASET_DIR, so the
two are zipped by index in training (`--config.data.dirs="('images', 'embeddings')"`):
  image_emb [E] float32   CLIP image embedding (unnormalised, projected)
  text_emb  [E] float32   CLIP text embedding of the caption (unnormalised, projected)
  text_enc  [L, D] float32 text token states (last_hidden_state, after the final LayerNorm)
  text_mask [L] bool       True on BOS..EOS
  tokens    [L] int32      the caption's CLIP token ids (the autoregressive prior reads them)
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any, Callable

import numpy as np


def load_clip(source: str | pathlib.Path) -> tuple[Any, Any]:
  """(CLIP module, params) from a training workdir, a bundle component folder or a transformers folder."""
  from unclip_jax import config_lib, paths
  from unclip_jax.stages import builders

  path = paths.as_path(source)          # a training workdir or bundle component may be gs://
  if not path.exists():
    raise FileNotFoundError(f"CLIP source {path} does not exist")
  if (path / "checkpoints").is_dir() or path.name == "checkpoints":
    from unclip_jax.ckpt import manager

    params, config, _ = manager.restore_params(path)
    if config.get("stage") != "clip":
      raise ValueError(f"{path} is a {config.get('stage')!r} training run, not a CLIP one")
    return builders.clip(config_lib.complete(config).model), params
  if (path / "params.safetensors").is_file():
    from unclip_jax import bundle

    cfg, params = bundle.load_component(path.parent, path.name)
    return builders.clip(cfg.model), params
  if (path / "config.json").is_file():
    from unclip_jax.convert import clip as convert_clip

    cfg, params = convert_clip.load_hf_clip(str(path))
    return builders.clip(cfg), params
  raise FileNotFoundError(f"{path} is neither a training workdir (checkpoints/), a bundle component "
                          "(params.safetensors) nor a transformers CLIP folder (config.json)")


def make_encoder(model, params) -> Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]:
  """(token ids [B, L] int32, pixels [B, S, S, 3]) -> dict of host arrays (jitted; one compile per batch size)."""
  import jax

  from unclip_jax.models.clip import CLIP

  if model.config.text is None or model.config.vision is None or model.config.projection_dim is None:
    raise ValueError("precomputing needs a CLIP with both towers and projections (a CLIPModel)")

  @jax.jit
  def encode(params, ids, pixels):
    text_emb, text_enc = model.apply({"params": params}, ids, method=CLIP.encode_text)
    image_emb, _ = model.apply({"params": params}, pixels, method=CLIP.encode_image)
    return {"image_emb": image_emb, "text_emb": text_emb, "text_enc": text_enc}

  return lambda ids, pixels: jax.tree.map(np.asarray, encode(params, ids, pixels))


def precompute(data_dir, clip_source, out_dir, name: str = "clip", *, batch_size: int = 64,
               overwrite: bool = False) -> pathlib.Path:
  """Encodes every example of the image-text dataset at `data_dir` in index order; returns the written path."""
  from unclip_jax.data import builders, image_processing, pipeline, tokenizer

  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  source, features = pipeline.open_source(data_dir)
  if "image" not in features or "caption" not in features:
    raise ValueError(f"{data_dir} is not an image-text dataset (features: {sorted(features)})")
  model, params = load_clip(clip_source)
  text_cfg, vision_cfg = model.config.text, model.config.vision
  tok = tokenizer.CLIPTokenizer(context_length=text_cfg.context_length)
  encode = make_encoder(model, params)
  n = len(source)
  if n == 0:
    raise ValueError(f"{data_dir} has no examples")
  columns: dict[str, list[np.ndarray]] = {k: [] for k in ("image_emb", "text_emb", "text_enc", "text_mask", "tokens")}
  for start in range(0, n, batch_size):
    rows = [source[i] for i in range(start, min(start + batch_size, n))]
    captions = [r["caption"].decode("utf-8") if isinstance(r["caption"], bytes) else str(r["caption"]) for r in rows]
    ids, mask = tok.tokenize(captions)
    pixels = image_processing.preprocess([np.asarray(r["image"]) for r in rows], size=vision_cfg.image_size,
                                         crop_size=vision_cfg.image_size)
    pad = batch_size - len(rows)                      # keep one compiled shape for the last, short batch
    if pad:
      ids = np.concatenate([ids, np.repeat(ids[-1:], pad, 0)])
      pixels = np.concatenate([pixels, np.repeat(pixels[-1:], pad, 0)])
    out = encode(ids, pixels)
    for k in ("image_emb", "text_emb", "text_enc"):
      columns[k].append(out[k][:len(rows)])
    columns["text_mask"].append(mask[:len(rows)])
    columns["tokens"].append(ids[:len(rows)].astype(np.int32))
    print(f"encoded {min(start + batch_size, n)}/{n}", file=sys.stderr)
  arrays = {k: np.concatenate(v) for k, v in columns.items()}
  meta = {"source_dataset": str(pipeline.resolve_dataset_dir(data_dir)), "clip": str(clip_source)}
  return builders.build_embeddings(arrays, out_dir, name, metadata=meta, overwrite=overwrite)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m unclip_jax.data.precompute", description=__doc__.split("\n\n")[0])
  p.add_argument("--data", required=True, help="image-text dataset written by unclip_jax.data.build")
  p.add_argument("--clip", required=True, help="CLIP training workdir, bundle clip folder or transformers folder")
  p.add_argument("--out", required=True, help="tfds data_dir to write the embeddings dataset into")
  p.add_argument("--name", default="clip", help="embeddings dataset name")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--overwrite", action="store_true")
  args = p.parse_args(argv)
  try:
    path = precompute(args.data, args.clip, args.out, args.name, batch_size=args.batch_size, overwrite=args.overwrite)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({"written": str(path)}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
