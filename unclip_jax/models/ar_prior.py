"""Autoregressive prior (unCLIP §2.2): CLIP image embedding as a sequence of discrete codes.

Pipeline:
  image_emb [B, E] --PCA (K = 319 components, ordered by eigenvalue)--> z [B, K]
                   --per-dimension uniform quantisation into 1024 buckets--> codes [B, K] int32
  a causal transformer predicts the codes from the prefix
    [caption tokens (L), text embedding (1), quantised dot product z_i·z_t (1)]
  and sampling decodes codes -> bucket centres -> inverse PCA.

The dot-product token lets sampling ask for a high text-image similarity (the paper samples it from the top half
of the training distribution); `DotQuantizer.bucket_for_quantile` picks that bucket.

Classifier-free guidance: in training, with probability `text_drop_prob` the caption tokens are masked out, the
text embedding is zeroed and the dot token becomes the extra "null" index (a similarity with a dropped text is
meaningless); sampling mixes log-probabilities u + s·(c - u) of the doubled batch [uncond; cond].

There is no PyTorch reference for this model (OpenAI did not release it), so it has no converter; parameters
follow the same naming style as the diffusion prior. Sampling recomputes the full sequence at every step (no KV
cache): O(K²) work, fine for K = 319 at inference batch sizes but not optimised.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.models import layers
from unclip_jax.models.prior import MASK_VALUE, TransformerBlock, dense, layer_norm

Dtype = Any


# ---- PCA and quantisation (host numpy, fitted once on training embeddings) -----------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class PCA:
  """mean [E], components [K, E] (rows orthonormal, by decreasing eigenvalue), explained_variance [K]."""
  mean: np.ndarray
  components: np.ndarray
  explained_variance: np.ndarray
  total_variance: float

  @classmethod
  def fit(cls, x: np.ndarray, num_components: int = 319) -> "PCA":
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
      raise ValueError(f"PCA.fit expects [N, E] embeddings, got shape {x.shape}")
    if not 0 < num_components <= x.shape[1]:
      raise ValueError(f"num_components must be in [1, {x.shape[1]}], got {num_components}")
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    var = s ** 2 / max(x.shape[0] - 1, 1)
    return cls(mean.astype(np.float32), vt[:num_components].astype(np.float32),
               var[:num_components].astype(np.float32), float(var.sum()))

  @property
  def num_components(self) -> int:
    return int(self.components.shape[0])

  @property
  def variance_kept(self) -> float:
    """Fraction of the training embeddings' variance the K components keep."""
    return float(self.explained_variance.sum() / self.total_variance)

  def encode(self, x):
    """[..., E] -> [..., K]."""
    return (jnp.asarray(x, jnp.float32) - self.mean) @ self.components.T

  def decode(self, z):
    """[..., K] -> [..., E]."""
    return jnp.asarray(z, jnp.float32) @ self.components + self.mean


@dataclasses.dataclass(frozen=True, eq=False)
class Quantizer:
  """Per-dimension uniform buckets between `low` [K] and `high` [K] (training quantiles; values outside clip)."""
  low: np.ndarray
  high: np.ndarray
  num_buckets: int = 1024

  @classmethod
  def fit(cls, z: np.ndarray, num_buckets: int = 1024, quantile: float = 0.001) -> "Quantizer":
    z = np.asarray(z, np.float64)
    low, high = np.quantile(z, quantile, axis=0), np.quantile(z, 1 - quantile, axis=0)
    high = np.maximum(high, low + 1e-6)
    return cls(low.astype(np.float32), high.astype(np.float32), num_buckets)

  def encode(self, z):
    """[..., K] float -> [..., K] int32 bucket indices in [0, num_buckets)."""
    u = (jnp.asarray(z, jnp.float32) - self.low) / (self.high - self.low)
    return jnp.clip(jnp.floor(u * self.num_buckets), 0, self.num_buckets - 1).astype(jnp.int32)

  def decode(self, codes):
    """[..., K] int -> [..., K] bucket centres."""
    return self.low + (jnp.asarray(codes, jnp.float32) + 0.5) / self.num_buckets * (self.high - self.low)


@dataclasses.dataclass(frozen=True, eq=False)
class DotQuantizer:
  """Buckets of the cosine between text and image embeddings; index `num_buckets` is the null (dropped text)."""
  low: float
  high: float
  num_buckets: int = 1024
  train_quantiles: np.ndarray | None = None   # 101 quantiles of the training cosines (for bucket_for_quantile)

  @classmethod
  def fit(cls, text_emb: np.ndarray, image_emb: np.ndarray, num_buckets: int = 1024) -> "DotQuantizer":
    cos = np.asarray(cosine(text_emb, image_emb), np.float64)
    low, high = float(cos.min()), float(max(cos.max(), cos.min() + 1e-6))
    return cls(low, high, num_buckets, np.quantile(cos, np.linspace(0, 1, 101)).astype(np.float32))

  @property
  def null_index(self) -> int:
    return self.num_buckets

  def encode(self, cos):
    u = (jnp.asarray(cos, jnp.float32) - self.low) / (self.high - self.low)
    return jnp.clip(jnp.floor(u * self.num_buckets), 0, self.num_buckets - 1).astype(jnp.int32)

  def bucket_for_quantile(self, q: float = 0.75) -> int:
    """The bucket of the q-quantile of the training similarities (the paper samples from the top half)."""
    if self.train_quantiles is None:
      raise ValueError("this DotQuantizer was not fitted on data; pass a bucket index instead")
    return int(self.encode(np.interp(q, np.linspace(0, 1, 101), self.train_quantiles)))


def cosine(a, b):
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-12)


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
  remat: bool = False

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
    txt = dense(w, (None, "embed"), self.dtype, "text_emb_proj")(text_emb.astype(self.dtype))
    dot = nn.Embed(self.num_dot_buckets + 1, w, dtype=self.dtype, embedding_init=emb_init,
                   name="dot_embedding")(dot_bucket)
    code = nn.Embed(self.num_buckets, w, dtype=self.dtype, embedding_init=emb_init, name="code_embedding")(codes_in)
    h = jnp.concatenate([tok, txt[:, None], dot[:, None], code], axis=1)                 # [B, S, W]
    pos = self.param("positional_embedding",
                     nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "length", "embed")),
                     (1, self.seq_len, w), jnp.float32)
    h = h + pos.astype(self.dtype)
    keep = jnp.concatenate([text_mask.astype(bool), jnp.ones((b, 2 + k - 1), bool)], axis=1)   # [B, S]
    s = self.seq_len
    causal = jnp.where(jnp.triu(jnp.ones((s, s), bool), k=1), MASK_VALUE, 0.0)
    bias = layers.attention_bias_from_mask(keep, masked_value=MASK_VALUE)[:, None, None, :] + causal
    block = nn.remat(TransformerBlock) if self.remat else TransformerBlock
    for i in range(self.num_layers):
      h = block(self.num_heads, w // self.num_heads, self.dtype, name=f"transformer_blocks_{i}")(h, bias)
    h = layer_norm(self.dtype, "norm_out")(h[:, l + 1:])                                 # [B, K, W]
    return dense(self.num_buckets, ("embed", "vocab"), self.dtype, "to_logits")(h).astype(jnp.float32)


def init_params(model: ARPrior, rng: jax.Array):
  """Unboxed float32 params from dummy inputs of the right shapes."""
  k, l = model.num_components, model.text_len
  variables = model.init(rng, jnp.zeros((1, l), jnp.int32), jnp.ones((1, l), bool),
                         jnp.zeros((1, model.embedding_dim)), jnp.zeros((1,), jnp.int32),
                         jnp.zeros((1, k - 1), jnp.int32))
  return nn.unbox(variables)["params"]


# ---- objective and sampling -----------------------------------------------------------------------------------
def loss_fn(params, batch, rng, *, model: ARPrior, pca: PCA, quantizer: Quantizer, dot_quantizer: DotQuantizer,
            text_drop_prob: float = 0.1):
  """Cross-entropy over the K codes (mean), with text dropout for guidance.

  batch: tokens [B, L] int, text_mask [B, L] bool, text_emb [B, E], image_emb [B, E].
  Returns (loss, metrics with loss and code accuracy).
  """
  codes = quantizer.encode(pca.encode(batch["image_emb"]))                                # [B, K]
  dot = dot_quantizer.encode(cosine(batch["text_emb"], batch["image_emb"]))               # [B]
  tokens, mask, text_emb = batch["tokens"], batch["text_mask"], batch["text_emb"]
  dropped = jax.random.bernoulli(rng, text_drop_prob, (codes.shape[0],))
  mask = jnp.where(dropped[:, None], False, mask)
  text_emb = jnp.where(dropped[:, None], 0.0, text_emb)
  dot = jnp.where(dropped, dot_quantizer.null_index, dot)
  logits = model.apply({"params": params}, tokens, mask, text_emb, dot, codes[:, :-1])    # [B, K, V]
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logp, codes[..., None], axis=-1)[..., 0]
  loss = jnp.mean(nll)
  acc = jnp.mean((jnp.argmax(logits, -1) == codes).astype(jnp.float32))
  return loss, {"loss": loss, "code_acc": acc}


def sample(params, tokens, text_mask, text_emb, rng, *, model: ARPrior, pca: PCA, quantizer: Quantizer,
           dot_bucket: int, null_index: int, guidance_scale: float = 1.0, temperature: float = 1.0):
  """Samples codes autoregressively (one full forward per code) and decodes them to CLIP image embeddings.

  Args:
    tokens, text_mask [B, L], text_emb [B, E]: the caption and its CLIP text embedding.
    dot_bucket: the requested dot-product bucket (e.g. `DotQuantizer.bucket_for_quantile(0.75)`).
    null_index: `DotQuantizer.null_index` (the uncond branch's dot token).
    guidance_scale: CFG on log-probabilities, u + s·(c - u); 1 disables the uncond branch.
    temperature: softmax temperature (0 = greedy).
  Returns:
    (image_emb [B, E] float32, codes [B, K] int32).
  """
  b, k = tokens.shape[0], model.num_components
  guided = guidance_scale != 1.0
  dot = jnp.full((b,), dot_bucket, jnp.int32)
  if guided:
    tokens2 = jnp.concatenate([tokens, tokens])
    mask2 = jnp.concatenate([jnp.zeros_like(text_mask, bool), text_mask])
    emb2 = jnp.concatenate([jnp.zeros_like(text_emb), text_emb])
    dot2 = jnp.concatenate([jnp.full((b,), null_index, jnp.int32), dot])
  else:
    tokens2, mask2, emb2, dot2 = tokens, text_mask, text_emb, dot

  def body(i, codes):
    codes_in = codes[:, :-1]
    if guided:
      codes_in = jnp.concatenate([codes_in, codes_in])
    logits = model.apply({"params": params}, tokens2, mask2, emb2, dot2, codes_in)[:, i]   # [B or 2B, V]
    logp = jax.nn.log_softmax(logits)
    if guided:
      u, c = jnp.split(logp, 2)
      logp = u + guidance_scale * (c - u)
    if temperature == 0:
      nxt = jnp.argmax(logp, -1)
    else:
      nxt = jax.random.categorical(jax.random.fold_in(rng, i), logp / temperature, axis=-1)
    return codes.at[:, i].set(nxt.astype(jnp.int32))

  codes = jax.lax.fori_loop(0, k, body, jnp.zeros((b, k), jnp.int32))
  return pca.decode(quantizer.decode(codes)), codes


# ---- data statistics as (frozen) parameters -------------------------------------------------------------------
def fit_stats(text_emb: np.ndarray, image_emb: np.ndarray, *, num_components: int, num_buckets: int,
              num_dot_buckets: int) -> tuple[PCA, Quantizer, DotQuantizer]:
  """PCA, code quantiser and dot-product quantiser fitted on paired embeddings [N, E]."""
  pca = PCA.fit(image_emb, num_components)
  quantizer = Quantizer.fit(np.asarray(pca.encode(image_emb)), num_buckets)
  return pca, quantizer, DotQuantizer.fit(text_emb, image_emb, num_dot_buckets)


def stats_to_params(pca: PCA, quantizer: Quantizer, dot_quantizer: DotQuantizer) -> dict[str, np.ndarray]:
  """The fitted statistics as a parameter sub-tree, so checkpoints and bundles carry them (train them frozen)."""
  if dot_quantizer.train_quantiles is None:
    raise ValueError("dot_quantizer has no training quantiles; fit it with DotQuantizer.fit")
  f32 = lambda x: np.asarray(x, np.float32)
  return {"pca_mean": f32(pca.mean), "pca_components": f32(pca.components),
          "pca_explained_variance": f32(pca.explained_variance), "pca_total_variance": f32([pca.total_variance]),
          "code_low": f32(quantizer.low), "code_high": f32(quantizer.high),
          "dot_range": f32([dot_quantizer.low, dot_quantizer.high]), "dot_quantiles": f32(dot_quantizer.train_quantiles)}


def stats_from_params(stats, *, num_buckets: int, num_dot_buckets: int) -> tuple[PCA, Quantizer, DotQuantizer]:
  """Inverse of `stats_to_params`; works on traced arrays inside jit (no host conversion)."""
  pca = PCA(stats["pca_mean"], stats["pca_components"], stats["pca_explained_variance"],
            stats["pca_total_variance"][0])
  quantizer = Quantizer(stats["code_low"], stats["code_high"], num_buckets)
  dot = DotQuantizer(stats["dot_range"][0], stats["dot_range"][1], num_dot_buckets, stats["dot_quantiles"])
  return pca, quantizer, dot


def from_config(model_cfg, *, dtype: Dtype | None = None) -> ARPrior:
  """`configs/ar_prior.py` `model` block -> ARPrior."""
  fields = ("vocab_size", "embedding_dim", "text_len", "num_components", "num_buckets", "num_dot_buckets", "width",
            "num_layers", "num_heads", "remat")
  kwargs = {k: model_cfg[k] for k in fields if k in model_cfg}
  if kwargs.get("width", 1024) % kwargs.get("num_heads", 16):
    raise ValueError(f"width {kwargs['width']} is not divisible by num_heads {kwargs['num_heads']}")
  return ARPrior(**kwargs, dtype=jnp.dtype(dtype or jnp.float32))
