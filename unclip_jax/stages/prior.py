"""The diffusion prior stage (unCLIP §2.2): text conditioning -> CLIP image embedding.

Everything about the stage but the Linen module (`models/prior.py`): building it from the config, its data
statistics, the training loss and task, the null conditioning both share, and the sampler.

Training (`loss_fn`): x0 = normalize(CLIP image embedding); t ~ U{0..T-1} on the config's (cosine) schedule;
x_t = q_sample(x0, t, ε); the network predicts x̂0 from (x_t, t, text); loss = MSE(x̂0, x0) through the shared
`GaussianDiffusion` (prediction "x0", loss "mse").

Text dropout for classifier-free guidance: with probability `text_drop_prob` (0.1) an example's conditioning
(pooled text embedding, token states AND mask) is replaced by a fixed *null conditioning*, never by a learned one:
  * default (`null_text_cond`): zeros with an all-False mask, i.e. the text tokens are masked out entirely and the
    pooled embedding is zero;
  * or the CLIP encoding of the empty prompt "" (Karlo's `cf_token`/`cf_mask` choice, and what diffusers'
    `UnCLIPPipeline` feeds the uncond branch): pass it as `null_cond`.
Why fixed, not learned: a learned null would be a parameter with no slot in the diffusers/Karlo layouts, so the
converted checkpoints could not be sampled by diffusers; and the uncond branch at sampling time must see exactly
the null used in training, which a fixed tensor guarantees. The noised image token x_t is never dropped
(DALLE2-pytorch drops it too; we do not).

Padding: `text_mask` [B, L] is True on real tokens; the model adds the causal mask to it (prior.py).

Sampling (`sample`): DDPM (or DDIM) over a respaced schedule ("25"), classifier-free guidance on x̂0 with the
doubled batch [uncond; cond] (scale 4.0), x̂0 clamped to ±clip_range (5.0, diffusers' prior scheduler), then the
paper's re-ranking: `num_candidates` (2) samples per prompt, keep the one whose de-normalised embedding has the
highest cosine (= dot product of unit vectors) with the CLIP text embedding. Returns CLIP-space embeddings.
"""
from __future__ import annotations

import functools
from typing import Any, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion import samplers
from unclip_jax.diffusion.gaussian import GaussianDiffusion
from unclip_jax.models.prior import PriorTransformer
from unclip_jax.stages import builders, common
from unclip_jax.stages.common import EMBEDDING_KEYS, Task, TextCond

Params = Any


class Models(NamedTuple):
  """The prior stage's modules: the transformer and its Gaussian diffusion."""
  prior: PriorTransformer
  diffusion: GaussianDiffusion


def build(cfg, *, dtype=None) -> Models:
  """The stage's modules from a `configs/prior.py` config (dtype: default the config's compute dtype)."""
  return Models(builders.prior(cfg.model, dtype=dtype or cfg.dtype, remat=cfg.remat_policy),
                GaussianDiffusion.from_config(cfg.diffusion))


def init_params(models: Models, rng: jax.Array) -> Params:
  """Initial params (clip_mean 0, clip_std 1 until `with_clip_stats` sets them from data)."""
  return builders.init_prior(models.prior, rng)


def abstract_params(cfg) -> Params:
  """Shapes/dtypes of the stage's params (nothing allocated)."""
  return builders.abstract(builders.init_prior, build(cfg, dtype="float32").prior)


def null_text_cond(model: PriorTransformer, batch: int) -> TextCond:
  """The default null conditioning: zero embedding and token states, every text token masked."""
  return common.zeros_null_text(batch, model.num_embeddings, model.embedding_dim)


def _broadcast_null(model: PriorTransformer, null: TextCond, batch: int) -> TextCond:
  return common.broadcast_null(null, batch, model.num_embeddings, model.embedding_dim)


def check_text_cond(model: PriorTransformer, cond: TextCond, what: str = "text conditioning") -> None:
  """Shape checks with a message naming the expected sizes (the model re-checks inside apply)."""
  e, l = model.embedding_dim, model.num_embeddings
  if cond.mask is None:
    raise ValueError(f"{what}: the text mask is required ([B, {l}] bool, True on real tokens)")
  b = cond.emb.shape[0] if cond.emb.ndim == 2 else None
  if cond.emb.ndim != 2 or cond.emb.shape[1] != e:
    raise ValueError(f"{what}: text embedding must be [B, {e}], got {cond.emb.shape}")
  if cond.enc.shape != (b, l, e):
    raise ValueError(f"{what}: text token states must be [{b}, {l}, {e}], got {cond.enc.shape}")
  if cond.mask.shape != (b, l):
    raise ValueError(f"{what}: text mask must be [{b}, {l}], got {cond.mask.shape}")


def drop_text(cond: TextCond, null: TextCond, rng: jax.Array, prob: float) -> tuple[TextCond, jax.Array]:
  """Replaces each example's conditioning by the null with probability `prob`. Returns (cond, dropped [B])."""
  dropped = jax.random.bernoulli(rng, prob, (cond.batch,))
  null = common.broadcast_null(null, cond.batch, null.enc.shape[-2], null.emb.shape[-1])
  pick = lambda n, c: jnp.where(dropped.reshape((-1,) + (1,) * (c.ndim - 1)), n.astype(c.dtype), c)
  return TextCond(pick(null.emb, cond.emb), pick(null.enc, cond.enc), pick(null.mask, cond.mask)), dropped


# ---- training -----------------------------------------------------------------------------------------------
def loss_fn(params: Params, batch: dict[str, jax.Array], rng: jax.Array, *, model: PriorTransformer,
            diffusion: GaussianDiffusion, text_drop_prob: float = 0.1,
            null_cond: TextCond | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Prior training loss (MSE on x̂0 over uniformly drawn timesteps), pure and jittable.

  Args:
    params: the prior's params (clip_mean/clip_std hold data statistics; their gradient is zero).
    batch: image_emb [B, E] CLIP image embeddings (unnormalised), text_emb [B, E], text_enc [B, L, E],
      text_mask [B, L] bool.
    rng: key for timesteps, noise and text dropout.
    diffusion: the prior's `GaussianDiffusion` (prediction "x0", loss "mse").
    null_cond: what dropped examples see (see the module docstring); default zeros with an all-False mask.
  Returns:
    (scalar loss, metrics dict of scalars: loss, mse, drop_frac).
  """
  if diffusion.prediction != "x0":
    raise ValueError(f"the prior predicts x0; got a diffusion with prediction={diffusion.prediction!r}")
  missing = [k for k in ("image_emb", "text_emb", "text_enc", "text_mask") if k not in batch]
  if missing:
    raise ValueError(f"prior batch is missing {missing} (text_mask is required, True on real tokens)")
  cond = TextCond(batch["text_emb"], batch["text_enc"], batch["text_mask"])
  check_text_cond(model, cond, "prior batch")
  if batch["image_emb"].shape != cond.emb.shape:
    raise ValueError(f"image_emb must be {cond.emb.shape}, got {batch['image_emb'].shape}")
  t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
  variables = {"params": params}
  x0 = model.apply(variables, batch["image_emb"], method=PriorTransformer.normalize)          # [B, E]
  t = diffusion.sample_timesteps(t_rng, x0.shape[0])
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  x_t = diffusion.q_sample(x0, t, noise)
  if text_drop_prob > 0:
    null = null_cond if null_cond is not None else null_text_cond(model, cond.batch)
    cond, dropped = drop_text(cond, null, drop_rng, text_drop_prob)
  else:
    dropped = jnp.zeros((cond.batch,), bool)
  out = model.apply(variables, x_t, t, cond.emb, cond.enc, cond.mask)                          # [B, E]
  terms = diffusion.loss_terms(out, x0, x_t, t, noise)
  loss = jnp.mean(terms["loss"])
  return loss, {"loss": loss, "mse": jnp.mean(terms["mse"]), "drop_frac": jnp.mean(dropped.astype(jnp.float32))}


def stats_from_embeddings(image_emb: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-dimension (mean, std) of a set of CLIP image embeddings [N, E] -> ([1, E], [1, E]) for clip_stats."""
  x = jnp.asarray(image_emb, jnp.float32)
  return jnp.mean(x, 0, keepdims=True), jnp.std(x, 0, keepdims=True)


def with_clip_stats(params: Params, mean: jax.Array, std: jax.Array) -> Params:
  """Params with clip_mean/clip_std replaced (shapes [1, E] or [E])."""
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  if mean.shape[-1] != params["clip_mean"].shape[-1] or std.shape[-1] != params["clip_std"].shape[-1]:
    raise ValueError(f"CLIP stats must have {params['clip_mean'].shape[-1]} entries, got {mean.shape}, {std.shape}")
  return {**params, "clip_mean": mean.reshape(1, -1), "clip_std": std.reshape(1, -1)}


# ---- sampling -----------------------------------------------------------------------------------------------
def model_fn_for(model: PriorTransformer, params: Params, cond: TextCond):
  """`model_fn(x [N, E], t [N]) -> x̂0 [N, E]` with the conditioning bound (N = cond.batch)."""
  def fn(x, t):
    return model.apply({"params": params}, x, t, cond.emb, cond.enc, cond.mask)
  return fn


def _tile(cond: TextCond, n: int) -> TextCond:
  return jax.tree.map(lambda x: jnp.tile(x, (n,) + (1,) * (x.ndim - 1)), cond)


def sample(params: Params, cond: TextCond, rng: jax.Array, *, model: PriorTransformer,
           diffusion: GaussianDiffusion, steps: str | int = "25",
           settings: samplers.SamplerSettings = samplers.SamplerSettings(guidance_scale=4.0, clip_range=5.0),
           num_candidates: int = 2, null_cond: TextCond | None = None, x_T: jax.Array | None = None,
           return_all: bool = False, progress=None):
  """Samples CLIP image embeddings for text conditioning `cond` (traceable; jit the caller).

  Args:
    cond: [B] text conditioning.
    rng: split into (x_T key, per-step noise key): `latent_rng, noise_rng = jax.random.split(rng)`; step i's
      noise is `samplers.step_noise(noise_rng, i, (num_candidates·B, E))`. Or per-row keys [B]: each row's key
      is split the same way and candidate k of row b uses fold_in(part, k) (`row_candidate_keys`), so a row's
      result does not depend on the rest of the batch.
    settings: sampler settings; guidance_scale != 1 runs the doubled batch [uncond; cond].
    num_candidates: n samples per prompt; the one with the highest cosine with `cond.emb` is kept.
    null_cond: the uncond branch's conditioning (default: `null_text_cond`; pass what training used).
    x_T: optional initial noise [num_candidates·B, E], candidate-major (row k·B + b is candidate k of prompt b).
    return_all: also return all candidates [n, B, E] (CLIP space) and their scores [n, B].
    progress: optional per-step callback (e.g. `samplers.ProgressBar`), as in `samplers.sample`.
  Returns:
    [B, E] float32 image embeddings in CLIP space (de-normalised), or (best, candidates, scores).
  """
  check_text_cond(model, cond)
  if num_candidates < 1:
    raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
  b, e, n = cond.batch, model.embedding_dim, num_candidates
  if samplers.is_row_keys(rng):                             # per-row keys [B]: rows independent of each other
    if rng.shape[0] != b:
      raise ValueError(f"per-row keys [{rng.shape[0]}] do not match the batch {b}")
    latent_rng, noise_rng = (row_candidate_keys(r, n) for r in jnp.moveaxis(jax.vmap(jax.random.split)(rng), 1, 0))
    if x_T is None:
      x_T = samplers.row_normal(latent_rng, (e,))
  else:
    latent_rng, noise_rng = jax.random.split(rng)
  if x_T is None:
    x_T = jax.random.normal(latent_rng, (n * b, e), jnp.float32)
  elif x_T.shape != (n * b, e):
    raise ValueError(f"x_T must be [{n * b}, {e}] (num_candidates·B, E), got {x_T.shape}")
  conds = _tile(cond, n)
  if settings.guidance_scale != 1.0:
    null = null_cond if null_cond is not None else null_text_cond(model, b)
    null = _broadcast_null(model, null, b)
    check_text_cond(model, null, "null_cond")
    bound = jax.tree.map(lambda u, c: jnp.concatenate([u.astype(c.dtype), c]), _tile(null, n), conds)  # [uncond; cond]
  else:
    bound = conds
  x0 = samplers.sample(model_fn_for(model, params, bound), x_T, noise_rng, diffusion=diffusion, steps=steps,
                       settings=settings, progress=progress)                                 # [n·B, E]
  emb = model.apply({"params": params}, x0, method=PriorTransformer.denormalize).reshape(n, b, e)
  scores = jnp.einsum("nbe,be->nb", _unit(emb), _unit(cond.emb.astype(jnp.float32)))
  best = jnp.take_along_axis(emb, jnp.argmax(scores, axis=0)[None, :, None], axis=0)[0]         # [B, E]
  return (best, emb, scores) if return_all else best


def row_candidate_keys(keys: jax.Array, n: int) -> jax.Array:
  """Per-row keys [B] -> candidate-major keys [n·B]: row k·B + b is fold_in(keys[b], k) (n = 1: the keys)."""
  if n == 1:
    return keys
  return jnp.concatenate([jax.vmap(lambda r, k=k: jax.random.fold_in(r, k))(keys) for k in range(n)])


def _unit(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def make_sampler(cfg, model: PriorTransformer, diffusion: GaussianDiffusion | None = None):
  """A jitted `(params, cond, rng, null_cond=None) -> [B, E]` with the config's steps, guidance and candidates.

  `cfg.null_text` "zeros" uses `null_text_cond`; "empty_prompt" requires `null_cond` (the CLIP encoding of "").
  """
  diffusion = diffusion or GaussianDiffusion.from_config(cfg.diffusion)
  settings = common.sampler_settings(cfg)
  null_text = common.check_null_text(cfg.null_text)

  def run(params, cond, rng, null_cond=None):
    if null_cond is None and null_text == "empty_prompt" and settings.guidance_scale != 1.0:
      raise ValueError("null_text='empty_prompt' needs null_cond (the CLIP encoding of the empty prompt)")
    return sample(params, cond, rng, model=model, diffusion=diffusion, steps=cfg.sampling.steps, settings=settings,
                  num_candidates=cfg.num_candidates, null_cond=null_cond)
  return jax.jit(run)


# ---- scanned and looped parameter trees -----------------------------------------------------------------------------
def stack_blocks(params, num_layers: int):
  """Looped tree (`transformer_blocks_{i}/...`) -> scanned tree (`transformer_blocks/...` stacked on axis 0)."""
  blocks = [params[f"transformer_blocks_{i}"] for i in range(num_layers)]
  rest = {k: v for k, v in params.items() if not k.startswith("transformer_blocks_")}
  if len(rest) + num_layers != len(params):
    raise ValueError(f"params have {len(params) - len(rest)} transformer blocks, expected {num_layers}")
  return {**rest, "transformer_blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def unstack_blocks(params):
  """Scanned tree -> looped tree (the layout `convert/prior.py` reads and writes)."""
  stacked = params["transformer_blocks"]
  n = jax.tree.leaves(stacked)[0].shape[0]
  rest = {k: v for k, v in params.items() if k != "transformer_blocks"}
  return {**rest, **{f"transformer_blocks_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)}}


# ---- the training task --------------------------------------------------------------------------------------------
def embedding_stats(batches: Iterator[dict], num_examples: int) -> tuple[jax.Array, jax.Array]:
  """Per-dimension mean/std of `image_emb` over the first `num_examples` examples: the prior's clip_mean/std."""
  seen = []
  while sum(len(b) for b in seen) < num_examples:
    seen.append(np.asarray(next(batches)["image_emb"]))
  return stats_from_embeddings(jnp.asarray(np.concatenate(seen)[:num_examples]))


def make_task(cfg, *, data: Iterator[dict] | None = None, stats_data: Iterator[dict] | None = None,
              eval_data: Iterator[dict] | None = None, mesh=None) -> Task:
  """The diffusion prior on precomputed CLIP embeddings; clip_mean/std are set from the data at init.

  Evaluation: cosine of sampled image embeddings (the config's sampler) with the true ones, next to the
  text-embedding baseline cos(text_emb, image_emb). (`mesh` is unused: every task takes it.)"""
  del mesh
  models = build(cfg)
  stats = embedding_stats(stats_data if stats_data is not None else common.data_iterator(cfg, None),
                          cfg.stats_examples)
  data = data if data is not None else common.data_iterator(cfg, None)

  def init(rng):
    return with_clip_stats(init_params(models, rng), *stats)

  evaluate = None
  held = common.eval_batch(cfg, eval_data, None, EMBEDDING_KEYS)
  if held is not None:
    if cfg.null_text != "zeros":
      raise ValueError("the prior's periodic evaluation samples with null_text='zeros' only; set eval_every=0")
    sampler = make_sampler(cfg, models.prior, models.diffusion)
    cond = TextCond(held["text_emb"], held["text_enc"], held["text_mask"])

    def evaluate(params):
      emb = sampler(params, cond, jax.random.key(cfg.seed + 2))
      return {"prior_cosine": jnp.mean(common.cosine(emb, held["image_emb"])),
              "text_baseline_cosine": jnp.mean(common.cosine(held["text_emb"], held["image_emb"]))}

  loss = functools.partial(loss_fn, model=models.prior, diffusion=models.diffusion, text_drop_prob=cfg.text_drop_prob)
  data = common.MappedIterator(data, lambda b: common.select(b, EMBEDDING_KEYS))
  return Task(init_params=init, loss_fn=loss, data=data, evaluate=evaluate)
