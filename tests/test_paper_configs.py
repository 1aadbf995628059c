"""The `paper` size variants against the parameter counts of Ramesh et al. 2022 (arXiv:2204.06125), Appendix C,
Table 3, from abstract params (`stages.get(stage).abstract_params`: shapes only, nothing allocated), and the
paper's ViT-H/16 CLIP (clip:vit_h16) against OpenCLIP's published count.

Tolerances follow the precision of the table's figures: 5 % for 3.5B and 700M, 15 % for 300M and 25 % for the
1B figures, which are one significant digit (the diffusion prior's own width 2048 × 24 layers is 1.21B).
"""
import math
import os

import jax
import pytest

from unclip_jax import config_lib, stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(stage, variant, overrides=()):
  return config_lib.load_config(os.path.join(ROOT, "configs", f"{stage}.py:{variant}"), list(overrides))


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _abstract(cfg):
  params = stages.get(cfg.stage).abstract_params(cfg)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))     # nothing allocated
  return params


def test_paper_decoder_is_3_5b_with_its_text_transformer():
  """The unCLIP decoder as the paper builds it (text_encoder "glide_clip"): the GLIDE 64² trunk (UNet) + GLIDE's
  text transformer + the CLIP image-embedding projections (time embedding, 4 extra tokens)."""
  cfg = _load("decoder", "paper")
  assert cfg.model.text_encoder == "glide_clip"
  params = _abstract(cfg)
  enc = params["text_encoder"]
  transformer, clip = _count(enc["text_encoder"]), _count({k: v for k, v in enc.items() if k != "text_encoder"})
  total = _count(params)
  print(f"decoder:paper unet {_count(params['unet']):,} transformer {transformer:,} CLIP projections {clip:,} "
        f"total {total:,}")
  assert total == pytest.approx(3.5e9, rel=0.05)
  assert transformer == pytest.approx(1.2e9, rel=0.15)                 # 24 × 12 · 2048² + embeddings
  # time-embedding projection E x 4·512 and the 4 extra tokens E x 4·2048 (+ biases), the learned null embedding E
  assert clip == 1024 * 2048 + 2048 + 1024 * 4 * 2048 + 4 * 2048 + 1024
  m = cfg.model
  assert (m.block_out_channels, m.layers_per_block, m.head_dim) == ((512, 1024, 1536, 2048), 3, 64)
  assert [64 // 2 ** i for i, a in enumerate(m.attention_levels) if a] == [32, 16, 8]
  assert (cfg.batch_size, cfg.optim.lr, cfg.num_train_steps) == (2048, 1.2e-4, 800_000)
  karlo_style = _abstract(_load("decoder", "paper", ["model.text_encoder=text_proj"]))
  assert _count(karlo_style["unet"]) == _count(params["unet"])


@pytest.mark.parametrize("stage,variant,paper,rel", [
    ("prior", "paper", 1.0e9, 0.25),
    ("ar_prior", "paper", 1.0e9, 0.25),
    ("upsampler", "paper_64_256", 700e6, 0.05),
    ("upsampler", "paper_256_1024", 300e6, 0.15),
])
def test_paper_sizes(stage, variant, paper, rel):
  cfg = _load(stage, variant)
  n = _count(_abstract(cfg))
  print(f"{stage}:{variant} {n:,} params (paper {paper:,.0f})")
  assert n == pytest.approx(paper, rel=rel)


@pytest.mark.parametrize("stage,variant,batch,lr,steps", [
    ("prior", "paper", 4096, 1.1e-4, 600_000), ("ar_prior", "paper", 4096, 1.6e-4, 1_000_000),
    ("upsampler", "paper_64_256", 1024, 1.2e-4, 1_000_000), ("upsampler", "paper_256_1024", 512, 1.0e-4, 1_000_000)])
def test_paper_training_hyperparameters(stage, variant, batch, lr, steps):
  cfg = _load(stage, variant)
  assert (cfg.batch_size, cfg.optim.lr, cfg.num_train_steps) == (batch, lr, steps)


def test_paper_upsampler_schedules_and_samplers():
  low, high = _load("upsampler", "paper_64_256"), _load("upsampler", "paper_256_1024")
  assert (low.diffusion.schedule, low.sampling.steps, low.sampling.sampler) == ("cosine", "27", "ddim")
  assert (high.diffusion.schedule, high.sampling.steps, high.sampling.sampler) == ("linear", "15", "ddim")
  assert (low.degradation, high.degradation) == ("blur", "bsr")
  assert low.model.block_out_channels == (320, 640, 960, 1280) and high.model.layers_per_block == 2


def test_clip_vit_h16_matches_openclip():
  """clip:vit_h16 against OpenCLIP's ViT-H-16 (its docs/model_profile.csv: 986.26M = image 632.23M + text 354.03M).
  Against ViT-H-14's 986.11M: 197 position rows instead of 257 (−76,800) but a 16×16 patch kernel (+230,400)."""
  cfg = _load("clip", "vit_h16")
  params = _abstract(cfg)
  image = _count(params["vision_model"]) + _count(params["visual_projection"])
  text = _count(params["text_model"]) + _count(params["text_projection"])
  total = _count(params)
  print(f"clip:vit_h16 {total:,} params (image {image:,}, text {text:,}, logit_scale 1)")
  assert total == image + text + 1
  assert image == pytest.approx(632.23e6, abs=0.005e6) and text == pytest.approx(354.03e6, abs=0.005e6)
  assert total == pytest.approx(986.26e6, abs=0.01e6)
  v = cfg.model.vision
  assert (v.image_size // v.patch_size) ** 2 + 1 == params["vision_model"]["embeddings"]["position_embedding"][
      "embedding"].shape[0] == 197
  assert (cfg.model.projection_dim, v.width, v.layers, v.width // v.heads) == (1024, 1280, 32, 80)
  t = cfg.model.text
  assert (t.width, t.layers, t.heads, t.mlp_dim) == (1024, 24, 16, 4096)
