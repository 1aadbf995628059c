"""CLIP: causal text transformer + ViT image encoder, contrastive training.

Variants: "tiny" (tests), "vit_b32" and "vit_l14" (the published OpenAI sizes; Karlo's unCLIP uses ViT-L/14),
"vit_h16" (the ViT-H/16 CLIP of Ramesh et al. 2022, at OpenCLIP's ViT-H-16 sizes), "shapes" (the embedded default
model). `model` is read by `unclip_jax.stages.builders.clip`; HF folders map onto the same fields through
`unclip_jax.convert.clip.config_from_hf`. Remat: the top-level `remat_policy`.
"""
import ml_collections as mlc

from unclip_jax import config_lib

VARIANTS = ("tiny", "vit_b32", "vit_l14", "vit_h16", "shapes", "shapes2")


def get_config(arg: str = ""):
  variant = config_lib.select_variant(arg, VARIANTS, default="vit_l14")
  c = config_lib.base_config("clip")
  c.variant = variant
  c.model = mlc.ConfigDict(dict(
      projection_dim=768,
      # eos_token_id=2 is the published OpenAI/HF value: pooling at argmax(ids) (EOT 49407 is the largest id).
      text=dict(vocab_size=49408, width=768, layers=12, heads=12, mlp_dim=3072, context_length=77,
                act="quick_gelu", eos_token_id=2, layer_norm_eps=1e-5),
      vision=dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096, act="quick_gelu",
                  num_channels=3, layer_norm_eps=1e-5),
      logit_scale=True,                 # learnable temperature (CLIPModel); needs both towers and projections
      logit_scale_init=2.6592, logit_scale_max=100.0,
      # both towers: "auto" (Pallas splash on TPU, cuDNN flash for the vision tower on CUDA GPUs in bf16/fp16, else
      # XLA) | "xla" | "cudnn" | "splash" (models.layers.resolve_attention)
      attention="auto",
  ))
  if variant == "vit_b32":
    c.model.projection_dim = 512
    c.model.text.update(width=512, heads=8, mlp_dim=2048)
    c.model.vision.update(patch_size=32, width=768, layers=12, heads=12, mlp_dim=3072)
  if variant == "vit_h16":
    # Ramesh et al. 2022 (arXiv:2204.06125) encode images with a ViT-H/16 CLIP (1024-wide embeddings, which
    # prior:paper predicts). Sizes of OpenCLIP's ViT-H-16 (mlfoundations/open_clip,
    # src/open_clip/model_configs/ViT-H-16.json; 24 text layers since its commit e33ff25 "... like DALLE-2 H"):
    # embed_dim 1024; vision 224 px, patch 16, width 1280, 32 layers, head_width 80 (16 heads), mlp_ratio 4 (5120);
    # text width 1024, 16 heads, 24 layers, mlp_ratio 4 (4096), context 77. OpenCLIP's towers use exact GELU
    # (nn.GELU unless quick_gelu is set) and argmax (EOT) pooling (eos_token_id=2 here). Its docs/model_profile.csv
    # gives ViT-H-16 986.26M parameters (image 632.23M, text 354.03M); tests/test_paper_configs.py checks ours.
    c.model.projection_dim = 1024
    c.model.text.update(width=1024, layers=24, heads=16, mlp_dim=4096, act="gelu")
    c.model.vision.update(image_size=224, patch_size=16, width=1280, layers=32, heads=16, mlp_dim=5120, act="gelu")
  if variant in ("shapes", "shapes2"):
    # The embedded default (issue: embedded model): CLIP for 32² captioned shapes, trained from scratch.
    c.model.projection_dim = 64
    c.model.text.update(width=64, layers=2, heads=4, mlp_dim=256, context_length=16)
    c.model.vision.update(image_size=32, patch_size=4, width=64, layers=3, heads=4, mlp_dim=256)
    c.batch_size = 128
    c.num_train_steps = 1500
    c.optim.update(lr=1e-3, warmup_steps=200, weight_decay=0.05, ema_decay=0.99)
    c.eval_every, c.eval_examples = 500, 64
    c.log_every, c.ckpt_every = 100, 1000
    c.dtype = "float32"
  if variant == "shapes2":
    # Two-object shapes (unclip_jax.shapes.pairs, the attribute-binding study): captions up to 17 tokens, and an
    # image tower deep enough to bind colour to shape per object (the negatives differ only in that binding).
    c.model.text.update(layers=3, context_length=24)
    c.model.vision.update(width=96, layers=4, mlp_dim=384)
    c.num_train_steps = 3000
    c.eval_every, c.ckpt_every = 1000, 500
  if variant == "tiny":
    c.model.projection_dim = 32
    c.model.text.update(vocab_size=99, width=32, layers=2, heads=4, mlp_dim=37, context_length=16)
    c.model.vision.update(image_size=30, patch_size=2, width=32, layers=2, heads=4, mlp_dim=37)
    c.batch_size = 8
  return c
