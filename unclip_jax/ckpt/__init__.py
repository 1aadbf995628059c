"""Checkpointing and PyTorch <-> Flax weight conversion."""
