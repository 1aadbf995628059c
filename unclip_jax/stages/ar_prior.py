"""The autoregressive prior stage (unCLIP §2.2, the alternative to the diffusion prior).

Everything about the stage but the transformer (`models/ar_prior.py`): building it from the config, the PCA and
quantisers that turn a CLIP image embedding into discrete codes (fitted once on training embeddings and stored as
frozen parameters `stats/...`), the loss, the sampler and the training task.

  image_emb [B, E] --PCA (K = 319 components, ordered by eigenvalue)--> z [B, K]
                   --per-dimension uniform quantisation into 1024 buckets--> codes [B, K] int32
  codes are predicted after [caption tokens (L), text embedding (1), quantised text·image cosine (1)]
  and sampling decodes codes -> bucket centres -> inverse PCA.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.models.ar_prior import ARPrior
from unclip_jax.stages import builders, common
from unclip_jax.stages.common import Task, cosine

Params = Any
KEYS = ("tokens", "text_mask", "text_emb", "image_emb")


class Models(NamedTuple):
  """The autoregressive prior stage's module."""
  prior: ARPrior


def build(cfg, *, dtype=None) -> Models:
  """The stage's module from a `configs/ar_prior.py` config (dtype: default the config's compute dtype)."""
  return Models(builders.ar_prior(cfg.model, dtype=dtype or cfg.dtype, remat=cfg.remat_policy))


def init_params(models: Models, rng: jax.Array, stats: dict | None = None) -> Params:
  """{"model": transformer params, "stats": PCA/quantiser statistics} (zeros until fitted, see `fit_stats`)."""
  model = models.prior
  if stats is None:
    k, e = model.num_components, model.embedding_dim
    stats = {"pca_mean": np.zeros((e,), np.float32), "pca_components": np.zeros((k, e), np.float32),
             "pca_explained_variance": np.zeros((k,), np.float32), "pca_total_variance": np.ones((1,), np.float32),
             "code_low": np.zeros((k,), np.float32), "code_high": np.ones((k,), np.float32),
             "dot_range": np.asarray([0.0, 1.0], np.float32), "dot_quantiles": np.zeros((101,), np.float32)}
  return {"model": builders.init_ar_prior(model, rng), "stats": jax.tree.map(jnp.asarray, stats)}


def abstract_params(cfg) -> Params:
  """Shapes/dtypes of the stage's params (nothing allocated)."""
  return builders.abstract(init_params, build(cfg, dtype="float32"))


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
          "dot_range": f32([dot_quantizer.low, dot_quantizer.high]),
          "dot_quantiles": f32(dot_quantizer.train_quantiles)}


def stats_from_params(stats, *, num_buckets: int, num_dot_buckets: int) -> tuple[PCA, Quantizer, DotQuantizer]:
  """Inverse of `stats_to_params`; works on traced arrays inside jit (no host conversion)."""
  pca = PCA(stats["pca_mean"], stats["pca_components"], stats["pca_explained_variance"],
            stats["pca_total_variance"][0])
  quantizer = Quantizer(stats["code_low"], stats["code_high"], num_buckets)
  dot = DotQuantizer(stats["dot_range"][0], stats["dot_range"][1], num_dot_buckets, stats["dot_quantiles"])
  return pca, quantizer, dot


# ---- the training task --------------------------------------------------------------------------------------------
def stats_loss_fn(params, batch, rng, *, model: ARPrior, text_drop_prob: float):
  """`loss_fn` on the stage's params: PCA and quantisers come from the frozen `stats` sub-tree."""
  pca, quantizer, dot = stats_from_params(params["stats"], num_buckets=model.num_buckets,
                                          num_dot_buckets=model.num_dot_buckets)
  return loss_fn(params["model"], batch, rng, model=model, pca=pca, quantizer=quantizer, dot_quantizer=dot,
                 text_drop_prob=text_drop_prob)


def make_task(cfg, *, data: Iterator[dict] | None = None, stats_data: Iterator[dict] | None = None,
              eval_data: Iterator[dict] | None = None, mesh=None) -> Task:
  """The autoregressive prior on precomputed embeddings + caption tokens; PCA/quantisers fitted at init on
  `cfg.stats_examples` examples and kept as frozen params. Evaluation: cosine of sampled vs true embeddings."""
  del mesh
  model = build(cfg).prior
  source = stats_data if stats_data is not None else common.data_iterator(cfg, None)
  seen = []
  while sum(len(b["image_emb"]) for b in seen) < cfg.stats_examples:
    seen.append(common.select(next(source), ("text_emb", "image_emb")))
  text_emb = np.concatenate([b["text_emb"] for b in seen])[:cfg.stats_examples]
  image_emb = np.concatenate([b["image_emb"] for b in seen])[:cfg.stats_examples]
  fitted = fit_stats(text_emb, image_emb, num_components=model.num_components, num_buckets=model.num_buckets,
                     num_dot_buckets=model.num_dot_buckets)
  logging.info("ar_prior: PCA to %d components keeps %.1f%% of the embedding variance (%d examples)",
               model.num_components, 100 * fitted[0].variance_kept, len(image_emb))
  stats = stats_to_params(*fitted)
  data = data if data is not None else common.data_iterator(cfg, None)

  evaluate = None
  held = common.eval_batch(cfg, eval_data, None, KEYS)
  if held is not None:
    dot_bucket = fitted[2].bucket_for_quantile(cfg.sampling.dot_quantile)

    @jax.jit
    def draw(params):
      pca, quantizer, dot = stats_from_params(params["stats"], num_buckets=model.num_buckets,
                                              num_dot_buckets=model.num_dot_buckets)
      emb, _ = sample(params["model"], held["tokens"], held["text_mask"], held["text_emb"],
                      jax.random.key(cfg.seed + 2), model=model, pca=pca, quantizer=quantizer,
                      dot_bucket=dot_bucket, null_index=dot.null_index,
                      guidance_scale=cfg.sampling.guidance_scale, temperature=cfg.sampling.temperature)
      return emb

    def evaluate(params):
      return {"prior_cosine": jnp.mean(cosine(draw(params), held["image_emb"])),
              "text_baseline_cosine": jnp.mean(cosine(held["text_emb"], held["image_emb"]))}

  loss = functools.partial(stats_loss_fn, model=model, text_drop_prob=cfg.text_drop_prob)
  return Task(init_params=lambda rng: init_params(Models(model), rng, stats), loss_fn=loss,
              data=common.MappedIterator(data, lambda b: common.select(b, KEYS)), evaluate=evaluate)
