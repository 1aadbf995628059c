"""Autoregressive prior (unCLIP §2.2, the alternative to the diffusion prior): CLIP image embedding as discrete codes.

PCA to `num_components` (319) dimensions, each quantised into `num_buckets` (1024) buckets, predicted by a causal
transformer after [caption tokens, text embedding, quantised text·image cosine]. PCA and quantisers are fitted on
`stats_examples` training embeddings before step 0 and stored as frozen parameters (`stats/...`).
`model` is read by `unclip_jax.stages.builders.ar_prior`; remat is the top-level `remat_policy`.
"""
import ml_collections as mlc

from unclip_jax import config_lib

VARIANTS = ("tiny", "paper")


def get_config(arg: str = ""):
  variant = config_lib.select_variant(arg, VARIANTS, default="paper")
  c = config_lib.base_config("ar_prior")
  c.variant = variant
  c.model = mlc.ConfigDict(dict(
      vocab_size=49408, embedding_dim=768, text_len=77,
      num_components=319, num_buckets=1024, num_dot_buckets=1024,
      width=1024, num_layers=24, num_heads=16,
  ))
  c.text_drop_prob = 0.1
  c.stats_examples = 100_000     # embeddings used to fit the PCA and the quantisers
  c.sampling = mlc.ConfigDict(dict(guidance_scale=2.0, temperature=1.0,
                                   dot_quantile=0.75))   # the paper samples the dot token from the top half
  c.optim.update(lr=3e-4, weight_decay=1e-2, frozen=("^stats/",))
  if variant == "paper":
    # Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents" (arXiv:2204.06125),
    # Appendix C, Table 3, column "AR prior" (1B): the latent decoder's width 1664, 24 layers, 26 heads; batch 4096, 1M
    # iterations, lr 1.6e-4, weight decay 4e-2, Adam β2 0.91, ε 1e-10, EMA 0.999; the paper's ViT-H/16 CLIP embeddings
    # (1024 wide). The paper's AR prior is an encoder-decoder (a text encoder of width 2048, 24 layers, context 256
    # before the latent decoder); this model is one causal stack over [caption tokens, text embedding, dot token,
    # codes], sized as its decoder.
    c.model.update(embedding_dim=1024, width=1664, num_layers=24, num_heads=26)
    c.batch_size = 4096
    c.num_train_steps = 1_000_000
    c.optim.update(lr=1.6e-4, weight_decay=4e-2, b2=0.91, eps=1e-10, ema_decay=0.999)
  if variant == "tiny":
    c.model.update(embedding_dim=32, text_len=16, num_components=12, num_buckets=64, num_dot_buckets=64,
                   width=32, num_layers=2, num_heads=4)
    c.stats_examples = 64
    c.batch_size = 8
  return c
