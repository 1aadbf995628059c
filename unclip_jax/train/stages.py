"""Per-stage training tasks for `train.loop`: which data, which parameters, which loss.

Every stage reads array_record datasets written by `unclip_jax.data.build` (images + captions) and, for the
prior and the decoder, the CLIP embeddings precomputed once for the same examples (zipped by index):
  clip       image + caption                        -> symmetric InfoNCE over the global batch (shard_map)
  prior      text_emb, text_enc, text_mask, image_emb -> MSE on x̂0, text dropped 10%
  ar_prior   tokens, text_mask, text_emb, image_emb -> cross-entropy on PCA/quantised codes, text dropped 10%
  decoder    image + image_emb, text_emb, text_enc, text_mask -> hybrid loss, CLIP emb dropped 10%, text 50%
  upsampler  image (full size)                      -> ε-MSE on random crops, degraded low-res condition
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from unclip_jax.data import pipeline
from unclip_jax.diffusion.gaussian import GaussianDiffusion
from unclip_jax.train.loop import Task

EMBEDDING_KEYS = ("image_emb", "text_emb", "text_enc", "text_mask")
AR_KEYS = ("tokens", "text_mask", "text_emb", "image_emb")


class MappedIterator:
  """Applies `fn` to every batch of a (checkpointable) iterator; position state passes through."""

  def __init__(self, it, fn: Callable[[dict], dict]):
    self._it, self._fn = it, fn

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return self._fn(next(self._it))

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state) -> None:
    self._it.set_state(state)


def _data_iterator(cfg, image_size: int | None) -> Iterator[dict]:
  """Per-host batches of the config's datasets (`data.dirs`, zipped by index)."""
  if not cfg.data.dirs:
    raise ValueError(f"stage {cfg.stage!r} needs data: set --config.data.dirs to dataset directories "
                     "written by `python -m unclip_jax.data.build`")
  per_host = pipeline.per_host_batch_size(cfg.batch_size, jax.process_count())
  ds = pipeline.make_dataset(list(cfg.data.dirs), batch_size=per_host, seed=cfg.seed, split=cfg.data.split,
                             image_size=image_size, max_scale=cfg.data.max_scale,
                             process_index=jax.process_index(), process_count=jax.process_count())
  return pipeline.make_iterator(ds, workers=cfg.data.workers)


def _eval_batch(cfg, data: Iterator[dict] | None, image_size: int | None, keys) -> dict | None:
  """`cfg.eval_examples` held examples for the periodic evaluation (None when evaluation is off).

  Taken from a second pass over the data with another shuffle seed (`data` overrides that, e.g. in tests)."""
  if int(cfg.get("eval_every", 0)) <= 0:
    return None
  if data is None:
    if not cfg.data.dirs:
      return None
    ds = pipeline.make_dataset(list(cfg.data.dirs), batch_size=int(cfg.eval_examples), seed=cfg.seed + 1,
                               split=cfg.data.split, image_size=image_size)
    data = pipeline.make_iterator(ds)
  batch = _select(next(data), keys)
  return {k: v[:int(cfg.eval_examples)] for k, v in batch.items()}


def _cosine(a, b):
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-12)


def _select(batch: dict, keys) -> dict:
  missing = [k for k in keys if k not in batch]
  if missing:
    raise KeyError(f"dataset batches lack {missing}; they have {sorted(batch)}")
  return {k: np.asarray(batch[k]) for k in keys}


# ---- prior ------------------------------------------------------------------------------------------------------
def embedding_stats(batches: Iterator[dict], num_examples: int) -> tuple[jax.Array, jax.Array]:
  """Per-dimension mean/std of `image_emb` over the first `num_examples` examples: the prior's clip_mean/std."""
  from unclip_jax import prior_lib

  seen = []
  while sum(len(b) for b in seen) < num_examples:
    seen.append(np.asarray(next(batches)["image_emb"]))
  return prior_lib.stats_from_embeddings(jnp.asarray(np.concatenate(seen)[:num_examples]))


def prior_task(cfg, data: Iterator[dict] | None = None, stats_data: Iterator[dict] | None = None,
               eval_data: Iterator[dict] | None = None, mesh=None) -> Task:
  """The diffusion prior on precomputed CLIP embeddings; clip_mean/std are set from the data at init.
  Evaluation: cosine of sampled image embeddings (the config's sampler) with the true ones, next to the
  text-embedding baseline cos(text_emb, image_emb). (`mesh` is unused: every task takes it.)"""
  from unclip_jax import prior_lib
  from unclip_jax.models import prior as prior_model

  model = prior_model.from_config(cfg.model, dtype=cfg.dtype)
  diffusion = GaussianDiffusion.from_config(cfg.diffusion)
  stats = embedding_stats(stats_data if stats_data is not None else _data_iterator(cfg, None),
                          cfg.stats_examples)
  data = data if data is not None else _data_iterator(cfg, None)

  def init_params(rng):
    return prior_lib.with_clip_stats(prior_model.init_params(model, rng), *stats)

  evaluate = None
  held = _eval_batch(cfg, eval_data, None, EMBEDDING_KEYS)
  if held is not None:
    if cfg.null_text != "zeros":
      raise ValueError("the prior's periodic evaluation samples with null_text='zeros' only; set eval_every=0")
    sampler = prior_lib.make_sampler(cfg, model, diffusion)
    cond = prior_lib.TextCond(held["text_emb"], held["text_enc"], held["text_mask"])

    def evaluate(params):
      emb = sampler(params, cond, jax.random.key(cfg.seed + 2))
      return {"prior_cosine": jnp.mean(_cosine(emb, held["image_emb"])),
              "text_baseline_cosine": jnp.mean(_cosine(held["text_emb"], held["image_emb"]))}

  loss_fn = functools.partial(prior_lib.loss_fn, model=model, diffusion=diffusion, text_drop_prob=cfg.text_drop_prob)
  return Task(init_params=init_params, loss_fn=loss_fn,
              data=MappedIterator(data, lambda b: _select(b, EMBEDDING_KEYS)), evaluate=evaluate)


# ---- autoregressive prior -----------------------------------------------------------------------------------------
def ar_prior_loss_fn(params, batch, rng, *, model, text_drop_prob: float):
  """Cross-entropy of the codes; PCA and quantisers come from the frozen `stats` sub-tree."""
  from unclip_jax.models import ar_prior

  pca, quantizer, dot = ar_prior.stats_from_params(params["stats"], num_buckets=model.num_buckets,
                                                   num_dot_buckets=model.num_dot_buckets)
  return ar_prior.loss_fn(params["model"], batch, rng, model=model, pca=pca, quantizer=quantizer,
                          dot_quantizer=dot, text_drop_prob=text_drop_prob)


def ar_prior_task(cfg, data: Iterator[dict] | None = None, stats_data: Iterator[dict] | None = None,
                  eval_data: Iterator[dict] | None = None, mesh=None) -> Task:
  """The autoregressive prior on precomputed embeddings + caption tokens; PCA/quantisers fitted at init on
  `cfg.stats_examples` examples and kept as frozen params. Evaluation: cosine of sampled vs true embeddings."""
  from unclip_jax.models import ar_prior

  model = ar_prior.from_config(cfg.model, dtype=cfg.dtype)
  source = stats_data if stats_data is not None else _data_iterator(cfg, None)
  seen = []
  while sum(len(b["image_emb"]) for b in seen) < cfg.stats_examples:
    seen.append(_select(next(source), ("text_emb", "image_emb")))
  text_emb = np.concatenate([b["text_emb"] for b in seen])[:cfg.stats_examples]
  image_emb = np.concatenate([b["image_emb"] for b in seen])[:cfg.stats_examples]
  fitted = ar_prior.fit_stats(text_emb, image_emb, num_components=model.num_components,
                              num_buckets=model.num_buckets, num_dot_buckets=model.num_dot_buckets)
  logging.info("ar_prior: PCA to %d components keeps %.1f%% of the embedding variance (%d examples)",
               model.num_components, 100 * fitted[0].variance_kept, len(image_emb))
  stats = ar_prior.stats_to_params(*fitted)
  data = data if data is not None else _data_iterator(cfg, None)

  def init_params(rng):
    return {"model": ar_prior.init_params(model, rng), "stats": jax.tree.map(jnp.asarray, stats)}

  evaluate = None
  held = _eval_batch(cfg, eval_data, None, AR_KEYS)
  if held is not None:
    dot_bucket = fitted[2].bucket_for_quantile(cfg.sampling.dot_quantile)

    @jax.jit
    def sample(params):
      pca, quantizer, dot = ar_prior.stats_from_params(params["stats"], num_buckets=model.num_buckets,
                                                       num_dot_buckets=model.num_dot_buckets)
      emb, _ = ar_prior.sample(params["model"], held["tokens"], held["text_mask"], held["text_emb"],
                               jax.random.key(cfg.seed + 2), model=model, pca=pca, quantizer=quantizer,
                               dot_bucket=dot_bucket, null_index=dot.null_index,
                               guidance_scale=cfg.sampling.guidance_scale, temperature=cfg.sampling.temperature)
      return emb

    def evaluate(params):
      return {"prior_cosine": jnp.mean(_cosine(sample(params), held["image_emb"])),
              "text_baseline_cosine": jnp.mean(_cosine(held["text_emb"], held["image_emb"]))}

  loss_fn = functools.partial(ar_prior_loss_fn, model=model, text_drop_prob=cfg.text_drop_prob)
  return Task(init_params=init_params, loss_fn=loss_fn, data=MappedIterator(data, lambda b: _select(b, AR_KEYS)),
              evaluate=evaluate)


# ---- decoder ----------------------------------------------------------------------------------------------------
def decoder_loss_fn(params, batch, rng, *, unet, text_proj, diffusion: GaussianDiffusion, clip_drop_prob: float,
                    text_drop_prob: float):
  """Decoder loss: hybrid (ε-MSE + λ·VLB) on images x0 [B, H, W, 3], conditioned through the text projection.

  The CLIP image embedding is replaced by the learned CFG embedding with prob `clip_drop_prob`; the text (token
  states, pooled embedding and mask) by zeros / an all-False mask with prob `text_drop_prob`, the null the
  sampler's unconditional branch uses.
  """
  x0 = batch["image"]
  b = x0.shape[0]
  t_rng, noise_rng, clip_rng, text_rng, dropout_rng = jax.random.split(rng, 5)
  drop_image = jax.random.bernoulli(clip_rng, clip_drop_prob, (b,))
  drop_text = jax.random.bernoulli(text_rng, text_drop_prob, (b,))
  keep = lambda x: jnp.where(drop_text.reshape((b,) + (1,) * (x.ndim - 1)), jnp.zeros_like(x), x)
  cond = text_proj.apply({"params": params["text_proj"]}, image_embeddings=batch["image_emb"],
                         prompt_embeds=keep(batch["text_emb"]), text_encoder_hidden_states=keep(batch["text_enc"]),
                         text_mask=keep(batch["text_mask"]).astype(bool), do_classifier_free_guidance=False,
                         drop_image=drop_image, method=type(text_proj).conditioning)
  t = diffusion.sample_timesteps(t_rng, b)
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  x_t = diffusion.q_sample(x0, t, noise)
  out = unet.apply({"params": params["unet"]}, x_t, t, deterministic=False, rngs={"dropout": dropout_rng}, **cond)
  terms = diffusion.loss_terms(out, x0, x_t, t, noise)
  loss = jnp.mean(terms["loss"])
  return loss, {"loss": loss, "mse": jnp.mean(terms["mse"]), "vb": jnp.mean(terms.get("vb", terms["mse"]))}


def decoder_task(cfg, data: Iterator[dict] | None = None, eval_data: Iterator[dict] | None = None,
                 mesh=None) -> Task:
  from unclip_jax.models import text_proj as text_proj_lib, unet as unet_lib

  if cfg.model.get("text_encoder", "text_proj") != "text_proj":
    raise ValueError(f"decoder training conditions through text_proj on precomputed CLIP embeddings; "
                     f"text_encoder={cfg.model.text_encoder!r} is supported for import and sampling only")
  unet = unet_lib.from_config(cfg.model, dtype=cfg.dtype, remat=cfg.remat_policy)
  text_proj = text_proj_lib.from_config(cfg.model, dtype=cfg.dtype)
  diffusion = GaussianDiffusion.from_config(cfg.diffusion)
  if diffusion.output_channels(3) != unet.out_channels:
    raise ValueError(f"decoder out_channels={unet.out_channels} but the diffusion needs "
                     f"{diffusion.output_channels(3)} (variance {diffusion.variance!r})")
  data = data if data is not None else _data_iterator(cfg, cfg.model.image_size)

  def init_params(rng):
    u_rng, t_rng = jax.random.split(rng)
    return {"unet": unet_lib.init_params(unet, u_rng), "text_proj": text_proj_lib.init_params(text_proj, t_rng)}

  evaluate = None
  held = _eval_batch(cfg, eval_data, cfg.model.image_size, ("image",) + EMBEDDING_KEYS)
  if held is not None:
    from unclip_jax import decoder_lib

    sampler = decoder_lib.make_sampler(cfg, unet, text_proj, diffusion)
    cond = decoder_lib.DecoderCond(held["image_emb"], held["text_emb"], held["text_enc"], held["text_mask"])
    x_T = jax.random.normal(jax.random.key(cfg.seed + 2), held["image"].shape)

    def evaluate(params):
      """Samples for the held examples' CLIP embeddings, shown beside the real images (top row)."""
      images = sampler(params, cond, x_T, jax.random.key(cfg.seed + 3))
      return {"samples": jnp.concatenate([held["image"], images]),
              "sample_mse": jnp.mean((images - held["image"]) ** 2)}

  loss_fn = functools.partial(decoder_loss_fn, unet=unet, text_proj=text_proj, diffusion=diffusion,
                              clip_drop_prob=cfg.clip_drop_prob, text_drop_prob=cfg.text_drop_prob)
  return Task(init_params=init_params, loss_fn=loss_fn,
              data=MappedIterator(data, lambda b: _select(b, ("image",) + EMBEDDING_KEYS)), evaluate=evaluate)


# ---- upsampler --------------------------------------------------------------------------------------------------
def upsampler_loss_fn(params, batch, rng, *, unet, diffusion: GaussianDiffusion, make_pair, conditioning: str,
                      resize_method: str):
  """ε-MSE on random crops of the full-size images, conditioned on a degraded low-res version of the crop."""
  pair_rng, t_rng, noise_rng, dropout_rng = jax.random.split(rng, 4)
  x0, low_res = make_pair(pair_rng, batch["image"])
  t = diffusion.sample_timesteps(t_rng, x0.shape[0])
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  x_t = diffusion.q_sample(x0, t, noise)
  from unclip_jax.models import unet as unet_lib

  inp = unet_lib.model_input(x_t, conditioning=conditioning, low_res=low_res, resize_method=resize_method)
  out = unet.apply({"params": params}, inp, t, deterministic=False, rngs={"dropout": dropout_rng})
  loss = jnp.mean(diffusion.loss_terms(out, x0, x_t, t, noise)["loss"])
  return loss, {"loss": loss}


def upsampler_task(cfg, data: Iterator[dict] | None = None, eval_data: Iterator[dict] | None = None,
                   mesh=None) -> Task:
  from unclip_jax.data import degradations
  from unclip_jax.models import unet as unet_lib

  if cfg.model.conditioning != "low_res":
    raise ValueError(f"upsampler training supports conditioning='low_res', got {cfg.model.conditioning!r}")
  unet = unet_lib.from_config(cfg.model, dtype=cfg.dtype, remat=cfg.remat_policy)
  diffusion = GaussianDiffusion.from_config(cfg.diffusion)
  data = data if data is not None else _data_iterator(cfg, cfg.model.image_size)
  evaluate = None
  held = _eval_batch(cfg, eval_data, cfg.model.image_size, ("image",))
  if held is not None:
    from unclip_jax import upsampler_lib

    if cfg.get("last_step_model", False):
      logging.info("upsampler evaluation samples every step with the model being trained (no last-step model)")
    eval_cfg = mlc.ConfigDict(cfg.to_dict())
    eval_cfg.last_step_model = False
    sampler = upsampler_lib.make_sampler(eval_cfg, unet, diffusion)
    low = cfg.model.low_res_size
    low_res = jax.image.resize(held["image"], (held["image"].shape[0], low, low, 3), "bicubic")
    x_T = jax.random.normal(jax.random.key(cfg.seed + 2), held["image"].shape)

    def evaluate(params):
      """Full-size upsampling of the held images' clean low-res versions (rows: bicubic, ours, target)."""
      images = sampler(params, None, low_res, x_T, jax.random.key(cfg.seed + 3))
      bicubic = jax.image.resize(low_res, images.shape, "bicubic")
      mse = jnp.mean((images - held["image"]) ** 2)
      return {"samples": jnp.concatenate([jnp.clip(bicubic, -1, 1), images, held["image"]]),
              "psnr": 10 * jnp.log10(4.0 / mse), "bicubic_psnr": 10 * jnp.log10(4.0 / jnp.mean((bicubic - held["image"]) ** 2))}

  loss_fn = functools.partial(upsampler_loss_fn, unet=unet, diffusion=diffusion,
                              make_pair=degradations.training_pair_from_config(cfg),
                              conditioning=cfg.model.conditioning, resize_method=cfg.model.resize_method)
  return Task(init_params=lambda rng: unet_lib.init_params(unet, rng), loss_fn=loss_fn,
              data=MappedIterator(data, lambda b: _select(b, ("image",))), evaluate=evaluate)


# ---- CLIP -------------------------------------------------------------------------------------------------------
def clip_loss_fn(params, batch, rng, *, model, mesh):
  """Symmetric InfoNCE over the global batch; `pixels` [B, H, W, 3] CLIP-normalised, `ids` [B, T] int32."""
  from unclip_jax.models import clip_losses

  del rng
  out = model.apply({"params": params}, input_ids=batch["ids"], pixels=batch["pixels"])
  if mesh is None:
    loss = clip_losses.contrastive_loss(out["text_embeds"], out["image_embeds"], out["logit_scale"])
  else:
    loss = clip_losses.sharded_contrastive_loss(out["text_embeds"], out["image_embeds"], out["logit_scale"], mesh)
  return loss, {"loss": loss, "temperature": jnp.exp(out["logit_scale"])}


def clip_batch(batch: dict, *, context_length: int) -> dict:
  """Host-side: captions -> token ids, images in [-1, 1] -> CLIP-normalised pixels."""
  from unclip_jax.data import image_processing, tokenizer

  ids, _ = tokenizer.tokenize(list(batch["caption"]), context_length=context_length)
  mean = np.asarray(image_processing.OPENAI_CLIP_MEAN, np.float32)
  std = np.asarray(image_processing.OPENAI_CLIP_STD, np.float32)
  pixels = ((np.asarray(batch["image"], np.float32) + 1.0) / 2.0 - mean) / std
  return {"ids": np.asarray(ids, np.int32), "pixels": pixels.astype(np.float32)}


def clip_task(cfg, data: Iterator[dict] | None = None, eval_data: Iterator[dict] | None = None, mesh=None) -> Task:
  from unclip_jax.models import clip as clip_lib

  model = clip_lib.from_config(cfg.model, dtype=cfg.dtype)
  size = cfg.model.vision.image_size
  data = data if data is not None else _data_iterator(cfg, size)
  to_clip = functools.partial(clip_batch, context_length=cfg.model.text.context_length)
  evaluate = None
  held = _eval_batch(cfg, eval_data, size, ("image", "caption"))
  if held is not None:
    held = to_clip(held)

    @jax.jit
    def evaluate(params):
      """In-batch retrieval: is each image's own caption the best-scoring one (and vice versa)?"""
      out = model.apply({"params": params}, input_ids=held["ids"], pixels=held["pixels"])
      sims = _cosine(out["image_embeds"][:, None], out["text_embeds"][None])                    # [N, N]
      labels = jnp.arange(sims.shape[0])
      return {"image_to_text_top1": jnp.mean(jnp.argmax(sims, 1) == labels),
              "text_to_image_top1": jnp.mean(jnp.argmax(sims, 0) == labels),
              "matched_cosine": jnp.mean(jnp.diag(sims))}

  return Task(init_params=lambda rng: clip_lib.init_params(model, rng),
              loss_fn=functools.partial(clip_loss_fn, model=model, mesh=mesh),
              data=MappedIterator(data, to_clip), evaluate=evaluate)


TASKS: dict[str, Callable[..., Task]] = {"prior": prior_task, "ar_prior": ar_prior_task, "decoder": decoder_task,
                                         "upsampler": upsampler_task, "clip": clip_task}


def make_task(cfg, **kwargs: Any) -> Task:
  """The Task for `cfg.stage` (see TASKS)."""
  if cfg.stage not in TASKS:
    raise ValueError(f"no trainer for stage {cfg.stage!r}; trainable stages: {sorted(TASKS)}")
  return TASKS[cfg.stage](cfg, **kwargs)
