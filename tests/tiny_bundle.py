"""A random tiny unCLIP bundle (all five components) built from the `tiny` configs, for pipeline tests."""
import pathlib

import jax
import numpy as np

from unclip_jax import bundle, config_lib, prior_lib
from unclip_jax.models import clip as clip_lib, prior as prior_model, text_proj as text_proj_lib, unet as unet_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONTEXT = 16          # = the tiny prior's num_embeddings


def _randomize(params, seed, scale=0.05):
  """Every leaf perturbed (zero-initialised output layers would make every stage trivially constant)."""
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [np.asarray(x, np.float32) + scale * rng.standard_normal(np.shape(x)).astype(np.float32)
                                   for x in leaves])


def tiny_configs():
  clip = config_lib.load_config("configs/clip.py:tiny", ["model.text.vocab_size=49408",
                                                         f"model.text.context_length={CONTEXT}",
                                                         "model.vision.image_size=32", "model.vision.patch_size=8"])
  prior = config_lib.load_config("configs/prior.py:tiny", ["sampling.steps='5'"])
  decoder = config_lib.load_config("configs/decoder.py:tiny", ["sampling.steps='5'"])
  sr = config_lib.load_config("configs/upsampler.py:tiny", ["sampling.steps='3'"])
  return clip, prior, decoder, sr


def build(path, seed=0, super_res=True):
  clip_cfg, prior_cfg, dec_cfg, sr_cfg = tiny_configs()
  key = jax.random.key(seed)
  clip_params = _randomize(clip_lib.init_params(clip_lib.from_config(clip_cfg.model), key), seed)
  prior = prior_model.from_config(prior_cfg.model)
  prior_params = _randomize(prior_model.init_params(prior, key), seed + 1)
  prior_params = prior_lib.with_clip_stats(prior_params, np.zeros((1, 32)), np.ones((1, 32)))
  unet = unet_lib.from_config(dec_cfg.model)
  text_proj = text_proj_lib.from_config(dec_cfg.model)
  dec_params = {"unet": _randomize(unet_lib.init_params(unet, key), seed + 2),
                "text_proj": _randomize(text_proj_lib.init_params(text_proj, key), seed + 3)}
  path = pathlib.Path(path)
  bundle.save_component(path, "clip", clip_cfg, clip_params)
  bundle.save_component(path, "prior", prior_cfg, prior_params)
  bundle.save_component(path, "decoder", dec_cfg, dec_params)
  if super_res:
    sr = unet_lib.from_config(sr_cfg.model)
    bundle.save_component(path, "super_res_first", sr_cfg, _randomize(unet_lib.init_params(sr, key), seed + 4))
    bundle.save_component(path, "super_res_last", sr_cfg, _randomize(unet_lib.init_params(sr, key), seed + 5))
  return path
