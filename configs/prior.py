"""Diffusion prior: CLIP text -> CLIP image embedding (Karlo PriorTransformer sizes).

`model` is read by `unclip_jax.stages.builders.prior`; remat is the top-level `remat_policy`.
"""
import ml_collections as mlc

from unclip_jax import config_lib

VARIANTS = ("tiny", "karlo", "paper", "shapes", "shapes2")


def get_config(arg: str = ""):
  variant = config_lib.select_variant(arg, VARIANTS, default="karlo")
  c = config_lib.base_config("prior")
  c.variant = variant
  c.model = mlc.ConfigDict(dict(
      embedding_dim=768,          # CLIP embedding width E
      num_embeddings=77,          # text tokens
      num_layers=20, num_heads=32, head_dim=64,   # inner width 2048
      additional_embeddings=4,    # [text_emb, time, x_t, prd]
      normalization="clip_stats",  # "clip_stats" (per-dim clip_mean/clip_std, Karlo) or "sqrt_dim"
      dropout=0.0,                 # diffusers field; the model has no dropout (Karlo trains with 0)
      scan_layers=False,           # nn.scan the blocks (stacked params; prior.stack_blocks converts)
      # "auto" (Pallas splash on TPU, else XLA) | "xla" | "cudnn" | "splash" (models.layers.resolve_attention)
      attention="auto",
  ))
  c.diffusion = config_lib.diffusion_config(prediction="x0", variance="fixed_small_log", loss="mse")
  c.sampling = config_lib.sampling_config(steps="25", guidance_scale=4.0, clip_range=5.0)
  c.text_drop_prob = 0.1
  # What dropped examples (training) and the uncond branch (sampling) see: "zeros" (zero embedding/tokens, all
  # tokens masked) or "empty_prompt" (CLIP encoding of "", as Karlo and diffusers' UnCLIPPipeline). Never learned.
  c.null_text = "zeros"
  c.stats_examples = 10_000       # examples used to set clip_mean/clip_std before training
  c.num_candidates = 2            # draw n, keep the one with the highest dot product with the text embedding
  # clip_mean/clip_std are data statistics: frozen (and never weight-decayed, see train/optim.py).
  c.optim.update(lr=1.1e-4, weight_decay=6e-2, frozen=("clip_mean", "clip_std"))
  if variant == "paper":
    # Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents" (arXiv:2204.06125),
    # Appendix C, Table 3, column "Diffusion prior" (1B): a decoder-only transformer of width 2048, 24 layers, 32 heads;
    # 1000 cosine steps, 64 sampling steps; batch 4096, 600K iterations, lr 1.1e-4, weight decay 6e-2, Adam β2 0.96, ε
    # 1e-6, EMA 0.9999; over the paper's ViT-H/16 CLIP embeddings (1024 wide). Not followed: the table's text context of
    # 256 (the prior reads CLIP's 77 text-token states here, as Karlo's) and its "analytic" sampling variance
    # (fixed_small_log kept).
    c.model.update(embedding_dim=1024, num_layers=24, num_heads=32, head_dim=64)
    c.sampling.update(steps="64")
    c.batch_size = 4096
    c.num_train_steps = 600_000
    c.optim.update(lr=1.1e-4, weight_decay=6e-2, b2=0.96, eps=1e-6, ema_decay=0.9999)
  if variant in ("shapes", "shapes2"):
    c.model.update(embedding_dim=64, num_embeddings=16, num_layers=4, num_heads=4, head_dim=32)
    # guidance 2 (not Karlo's 4): chosen from {1, 1.5, 2, 3} by adherence of the whole chain (shapes.evaluate, seed 1)
    c.sampling.guidance_scale = 2.0
    c.batch_size = 128
    c.num_train_steps = 2000
    c.stats_examples = 4096
    c.optim.update(lr=5e-4, warmup_steps=200, weight_decay=0.01, ema_decay=0.999)
    c.eval_every, c.eval_examples = 1000, 64
    c.log_every, c.ckpt_every = 100, 1000
    c.dtype = "float32"
  if variant == "shapes2":
    # Two-object shapes (unclip_jax.shapes.pairs): 24 text tokens (configs/clip.py:shapes2), 6 layers.
    c.model.update(num_embeddings=24, num_layers=6)
    c.ckpt_every = 500
  if variant == "tiny":
    c.model.update(embedding_dim=32, num_embeddings=16, num_layers=2, num_heads=2, head_dim=12)
    c.diffusion.timesteps = 1000
    c.batch_size = 8
  return c
