"""Gaussian diffusion shared by the prior, the decoder and the upsamplers.

- `schedules`: β/ᾱ tables and timestep respacing, computed from the config.
- `gaussian`: forward process, parameterisations, posterior, variances, losses.
- `samplers`: DDPM/DDIM updates, classifier-free guidance, the scan sampler and DDIM inversion.
"""
from unclip_jax.diffusion.gaussian import GaussianDiffusion
from unclip_jax.diffusion.samplers import ProgressBar, SamplerSettings, ddim_invert, make_sampler, sample
from unclip_jax.diffusion.schedules import NoiseSchedule, StepTable, respace, step_table

__all__ = ["GaussianDiffusion", "NoiseSchedule", "ProgressBar", "SamplerSettings", "StepTable", "ddim_invert",
           "make_sampler", "respace", "sample", "step_table"]
