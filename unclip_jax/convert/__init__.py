"""PyTorch <-> Flax weights: one converter per source layout, and the `python -m unclip_jax.convert` CLI.

  clip.py          transformers CLIP (and OpenAI CLIP state dicts) <-> our CLIP
  prior.py         diffusers PriorTransformer, Karlo's prior .ckpt <-> our prior
  unet.py          diffusers UNet2DConditionModel / UNet2DModel / UnCLIPTextProjModel, Karlo .ckpt <-> our UNet
  glide.py         GLIDE (guided-diffusion) UNet fields and text transformer <-> ours
  inception.py     pytorch-fid's FID Inception weights -> our `models.inception.InceptionV3FID`
  torch_layout.py  the key and tensor-layout rules they share, safe torch / safetensors reading
  cli.py           the command line (bundle in, bundle out)
"""
