"""Flax linen models: CLIP, priors, text projection and the ADM/GLIDE UNet."""
