"""The autoregressive prior's transformer (unCLIP §2.2): CLIP image embedding as a sequence of discrete codes.

Pipeline:
  image_emb [B, E] --PCA (K = 319 components, ordered by eigenvalue)--> z [B, K]
                   --per-dimension uniform quantisation into 1024 buckets--> codes [B, K] int32
  a causal transformer predicts the codes from the prefix
    [caption tokens (L), text embedding (1), quantised dot product z_i·z_t (1)]
  and sampling decodes codes -> bucket centres -> inverse PCA.

The dot-product token lets sampling ask for a high text-image similarity (the paper samples it from the top half
of the training distribution). PCA, quantisers, loss and sampler live in `unclip_jax/stages/ar_prior.py`.

Classifier-free guidance: in training, with probability `text_drop_prob` the caption tokens are masked out, the
text embedding is zeroed and the dot token becomes the extra "null" index (a similarity with a dropped text is
meaningless); sampling mixes log-probabilities u + s·(c - u) of the doubled batch [uncond; cond].

There is no PyTorch reference for this model (OpenAI did not release it), so it has no converter; parameters
follow the same naming style as the diffusion prior. Sampling recomputes the full sequence at every step (no KV
cache): O(K²) work, fine for K = 319 at inference batch sizes but not optimised.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models import layers
from unclip_jax.models.prior import TransformerBlock

Dtype = Any


# ---- the transformer ------------------------------------------------------------------------------------------
class ARPrior(nn.Module):
  """Causal transformer over [caption tokens (L), text emb, dot token, codes c_0..c_{K-2}].

  Output position L+1+k (the dot token for k=0, then code c_{k-1}) predicts code c_k; logits [B, K, V].

  Attributes:
    vocab_size: caption token vocabulary; embedding_dim: CLIP width E; text_len: L.
    num_components: K; num_buckets: V (code vocabulary); num_dot_buckets: dot-product buckets (+1 null).
  """
  vocab_size: int = 49408
  embedding_dim: int = 768
  text_len: int = 77
  num_components: int = 319
  num_buckets: int = 1024
  num_dot_buckets: int = 1024
  width: int = 1024
  num_layers: int = 24
  num_heads: int = 16
  dtype: Dtype = jnp.float32
  remat: str = "none"

  @property
  def seq_len(self) -> int:
    return self.text_len + 2 + self.num_components - 1

  @nn.compact
  def __call__(self, tokens, text_mask, text_emb, dot_bucket, codes_in):
    """Logits for every code.

    Args:
      tokens: [B, L] int caption token ids; text_mask: [B, L] bool (True on real tokens).
      text_emb: [B, E] CLIP text embedding.
      dot_bucket: [B] int in [0, num_dot_buckets] (the last index = null).
      codes_in: [B, K-1] int, the codes c_0..c_{K-2} (teacher forcing; entries past the sampled prefix are ignored
        by causality).
    Returns:
      [B, K, num_buckets] float32 logits.
    """
    b, l, k = tokens.shape[0], self.text_len, self.num_components
    if tokens.shape != (b, l) or text_mask is None or text_mask.shape != (b, l):
      raise ValueError(f"tokens and text_mask must be [B, {l}]; got {tokens.shape} and "
                       f"{None if text_mask is None else text_mask.shape}")
    if text_emb.shape != (b, self.embedding_dim):
      raise ValueError(f"text_emb must be [{b}, {self.embedding_dim}], got {text_emb.shape}")
    if codes_in.shape != (b, k - 1):
      raise ValueError(f"codes_in must be [{b}, {k - 1}] (K-1 = {k - 1}), got {codes_in.shape}")
    w = self.width
    emb_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))
    tok = nn.Embed(self.vocab_size, w, dtype=self.dtype, embedding_init=emb_init, name="token_embedding")(tokens)
    txt = layers.dense(w, (None, "embed"), self.dtype, "text_emb_proj")(text_emb.astype(self.dtype))
    dot = nn.Embed(self.num_dot_buckets + 1, w, dtype=self.dtype, embedding_init=emb_init,
                   name="dot_embedding")(dot_bucket)
    code = nn.Embed(self.num_buckets, w, dtype=self.dtype, embedding_init=emb_init, name="code_embedding")(codes_in)
    h = jnp.concatenate([tok, txt[:, None], dot[:, None], code], axis=1)                 # [B, S, W]
    pos = self.param("positional_embedding",
                     nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "length", "embed")),
                     (1, self.seq_len, w), jnp.float32)
    h = h + pos.astype(self.dtype)
    keep = jnp.concatenate([text_mask.astype(bool), jnp.ones((b, 2 + k - 1), bool)], axis=1)   # [B, S]
    block = layers.maybe_remat(TransformerBlock, self.remat)
    for i in range(self.num_layers):            # causal + key mask, kept on XLA (no `model.attention` field yet)
      h = block(self.num_heads, w // self.num_heads, self.dtype, attention="xla", name=f"transformer_blocks_{i}")(
          h, keep)
    h = layers.layer_norm(self.dtype, "norm_out")(h[:, l + 1:])                                 # [B, K, W]
    return layers.dense(self.num_buckets, ("embed", "vocab"), self.dtype, "to_logits")(h).astype(jnp.float32)
