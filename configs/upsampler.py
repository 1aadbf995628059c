"""Super-resolution UNets 64->256 and 256->1024: conv-only, conditioned on the upsampled low-res image.

`model` is read by `unclip_jax.stages.builders.unet`; the input is [x_t, bicubic(low_res)]
(`unclip_jax.stages.common.model_input`).
Compute dtype and remat policy are the top-level `dtype` / `remat_policy` (config_lib.base_config).
"""
import ml_collections as mlc

from unclip_jax import config_lib

VARIANTS = ("tiny", "karlo_64_256", "paper_64_256", "paper_256_1024", "shapes", "shapes2")


def get_config(arg: str = ""):
  variant = config_lib.select_variant(arg, VARIANTS, default="karlo_64_256")
  c = config_lib.base_config("upsampler")
  c.variant = variant
  c.model = mlc.ConfigDict(dict(
      low_res_size=64, image_size=256,
      conditioning="low_res",       # "low_res" | "inpaint_low_res"
      in_channels=None,             # None: derived from `conditioning` (6 or 10); else must agree with it
      out_channels=3,               # eps only
      block_out_channels=(320, 640, 960, 1280), layers_per_block=3,
      attention_levels=(False, False, False, False), mid_block_attention=False, head_dim=8,
      cross_attention_dim=None, class_embed_type=None,
      time_scale_shift="default", norm_num_groups=32, dropout=0.0,
      time_embed_dim=None,          # None: 4·block_out_channels[0]
      flip_sin_to_cos=True, freq_shift=0.0, center_input_sample=False,
      attention="auto",             # unused (no attention), declared because every UNet block has it
      resize_method="bicubic",      # = torch bicubic + antialias (Karlo); "bilinear" for GLIDE
  ))
  c.diffusion = config_lib.diffusion_config(prediction="eps", variance="fixed_small_log", loss="mse")
  c.sampling = config_lib.sampling_config(steps="7", guidance_scale=1.0, clip_range=1.0)
  c.degradation = "blur"          # "blur" (64->256) or "bsr" (256->1024)
  c.crop_fraction = 0.25          # train on random crops of 1/4 of the target size
  c.last_step_model = True        # Karlo: a separate model for the final step
  # The paper's upsamplers: Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents"
  # (arXiv:2204.06125), Appendix C, Table 3, columns "64→256" (700M) and "256→1024" (300M): conv-only UNets (no
  # attention), trained on random crops of a quarter of the target size, Adam β2 0.999, ε 1e-8, EMA 0.9999, 1M
  # iterations; no separate last-step model.
  if variant == "paper_64_256":
    # 320 channels × (1, 2, 3, 4), 3 res blocks per level, dropout 0.1; 1000 cosine steps, 27 DDIM steps; batch 1024,
    # lr 1.2e-4; Gaussian-blur degradation.
    c.model.update(dropout=0.1)
    c.sampling.update(steps="27", sampler="ddim", eta=0.0)
    c.batch_size = 1024
    c.optim.update(lr=1.2e-4)
  if variant == "paper_256_1024":
    # 192 channels × (1, 1, 2, 2, 4, 4), 2 res blocks per level, no dropout; 1000 linear steps, 15 DDIM steps; batch
    # 512, lr 1.0e-4; BSR degradation.
    c.model.update(low_res_size=256, image_size=1024, block_out_channels=(192, 192, 384, 384, 768, 768),
                   attention_levels=(False,) * 6, layers_per_block=2)
    c.diffusion.schedule = "linear"
    c.sampling.update(steps="15", sampler="ddim", eta=0.0)
    c.batch_size = 512
    c.optim.update(lr=1.0e-4)
    c.degradation = "bsr"
  if variant.startswith("paper_"):
    c.num_train_steps = 1_000_000
    c.optim.update(b2=0.999, eps=1e-8, ema_decay=0.9999)
    c.last_step_model = False
  if variant in ("shapes", "shapes2"):
    c.model.update(low_res_size=16, image_size=64, block_out_channels=(32, 64), attention_levels=(False, False),
                   layers_per_block=1, norm_num_groups=8)
    c.diffusion.prediction = "v"    # as the shapes decoder: a usable x̂0 from the first (ᾱ ≈ 0) of 7 steps
    c.sampling.update(steps="7")
    c.crop_fraction = 0.5
    c.last_step_model = False
    c.batch_size = 16
    c.num_train_steps = 3000
    c.optim.update(lr=5e-4, warmup_steps=200, ema_decay=0.999)
    c.eval_every, c.eval_examples = 1000, 16
    c.log_every, c.ckpt_every = 100, 1000
    c.dtype = "float32"
  if variant == "shapes2":
    # Two-object shapes (unclip_jax.shapes.pairs, drawn at 96²): 24² (configs/decoder.py:shapes2) -> 96², trained
    # on 32² crops (8² low-res).
    c.model.update(low_res_size=24, image_size=96)
    c.crop_fraction = 1 / 3
    c.ckpt_every = 500
  if variant == "tiny":
    c.model.update(low_res_size=16, image_size=32, block_out_channels=(16, 32, 48),
                   attention_levels=(False,) * 3, layers_per_block=2, norm_num_groups=8)
    c.batch_size = 8
  return c
