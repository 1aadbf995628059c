"""Super-resolution UNets 64->256 and 256->1024: conv-only, conditioned on the upsampled low-res image."""
import ml_collections as mlc

from unclip_jax import config_lib

VARIANTS = ("tiny", "karlo_64_256", "paper_256_1024")


def get_config(arg: str = ""):
  variant = config_lib.select_variant(arg, VARIANTS, default="karlo_64_256")
  c = config_lib.base_config("upsampler")
  c.variant = variant
  c.model = mlc.ConfigDict(dict(
      low_res_size=64, image_size=256, in_channels=6, out_channels=3,
      block_out_channels=(320, 640, 960, 1280), layers_per_block=3,
      time_scale_shift="default", norm_num_groups=32, dropout=0.0,
  ))
  c.diffusion = config_lib.diffusion_config(prediction="eps", variance="fixed_small_log", loss="mse")
  c.sampling = config_lib.sampling_config(steps="7", guidance_scale=1.0, clip_range=1.0)
  c.degradation = "blur"          # "blur" (64->256) or "bsr" (256->1024)
  c.crop_fraction = 0.25          # train on random crops of 1/4 of the target size
  c.last_step_model = True        # Karlo: a separate model for the final step
  if variant == "paper_256_1024":
    c.model.update(low_res_size=256, image_size=1024, block_out_channels=(192, 192, 384, 384, 768, 768),
                   layers_per_block=2)
    c.degradation = "bsr"
  if variant == "tiny":
    c.model.update(low_res_size=16, image_size=32, block_out_channels=(16, 32, 48), layers_per_block=2,
                   norm_num_groups=8)
    c.batch_size = 8
  return c
