"""unclip_jax: unCLIP (Ramesh et al. 2022) in JAX/Flax."""

__version__ = "0.1.0"
# Bumped whenever the layout of a saved checkpoint tree changes (see ckpt/).
CHECKPOINT_SCHEMA = 1
