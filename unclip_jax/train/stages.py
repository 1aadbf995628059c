"""Per-stage training tasks for `train.loop`: which data, which parameters, which loss.

Every stage reads array_record datasets written by `unclip_jax.data.build` (images + captions) and, for the
prior and the decoder, the CLIP embeddings precomputed once for the same examples (zipped by index):
  clip       image + caption                        -> symmetric InfoNCE over the global batch (shard_map)
  prior      text_emb, text_enc, text_mask, image_emb -> MSE on x̂0, text dropped 10%
  decoder    image + image_emb, text_emb, text_enc, text_mask -> hybrid loss, CLIP emb dropped 10%, text 50%
  upsampler  image (full size)                      -> ε-MSE on random crops, degraded low-res condition
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.data import pipeline
from unclip_jax.diffusion.gaussian import GaussianDiffusion
from unclip_jax.train.loop import Task

EMBEDDING_KEYS = ("image_emb", "text_emb", "text_enc", "text_mask")


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
               mesh=None) -> Task:
  """The diffusion prior on precomputed CLIP embeddings; clip_mean/std are set from the data at init.
  (`mesh` is unused: every stage's task takes it so `make_task` has one signature.)"""
  from unclip_jax import prior_lib
  from unclip_jax.models import prior as prior_model

  model = prior_model.from_config(cfg.model, dtype=cfg.dtype)
  diffusion = GaussianDiffusion.from_config(cfg.diffusion)
  stats = embedding_stats(stats_data if stats_data is not None else _data_iterator(cfg, None),
                          cfg.stats_examples)
  data = data if data is not None else _data_iterator(cfg, None)

  def init_params(rng):
    return prior_lib.with_clip_stats(prior_model.init_params(model, rng), *stats)

  loss_fn = functools.partial(prior_lib.loss_fn, model=model, diffusion=diffusion, text_drop_prob=cfg.text_drop_prob)
  return Task(init_params=init_params, loss_fn=loss_fn,
              data=MappedIterator(data, lambda b: _select(b, EMBEDDING_KEYS)))


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


def decoder_task(cfg, data: Iterator[dict] | None = None, mesh=None) -> Task:
  from unclip_jax.models import text_proj as text_proj_lib, unet as unet_lib

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

  loss_fn = functools.partial(decoder_loss_fn, unet=unet, text_proj=text_proj, diffusion=diffusion,
                              clip_drop_prob=cfg.clip_drop_prob, text_drop_prob=cfg.text_drop_prob)
  return Task(init_params=init_params, loss_fn=loss_fn,
              data=MappedIterator(data, lambda b: _select(b, ("image",) + EMBEDDING_KEYS)))


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


def upsampler_task(cfg, data: Iterator[dict] | None = None, mesh=None) -> Task:
  from unclip_jax.data import degradations
  from unclip_jax.models import unet as unet_lib

  if cfg.model.conditioning != "low_res":
    raise ValueError(f"upsampler training supports conditioning='low_res', got {cfg.model.conditioning!r}")
  unet = unet_lib.from_config(cfg.model, dtype=cfg.dtype, remat=cfg.remat_policy)
  diffusion = GaussianDiffusion.from_config(cfg.diffusion)
  data = data if data is not None else _data_iterator(cfg, cfg.model.image_size)
  loss_fn = functools.partial(upsampler_loss_fn, unet=unet, diffusion=diffusion,
                              make_pair=degradations.training_pair_from_config(cfg),
                              conditioning=cfg.model.conditioning, resize_method=cfg.model.resize_method)
  return Task(init_params=lambda rng: unet_lib.init_params(unet, rng), loss_fn=loss_fn,
              data=MappedIterator(data, lambda b: _select(b, ("image",))))


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


def clip_task(cfg, data: Iterator[dict] | None = None, mesh=None) -> Task:
  from unclip_jax.models import clip as clip_lib

  model = clip_lib.from_config(cfg.model, dtype=cfg.dtype)
  data = data if data is not None else _data_iterator(cfg, cfg.model.vision.image_size)
  return Task(init_params=lambda rng: clip_lib.init_params(model, rng),
              loss_fn=functools.partial(clip_loss_fn, model=model, mesh=mesh),
              data=MappedIterator(data, functools.partial(clip_batch,
                                                          context_length=cfg.model.text.context_length)))


TASKS: dict[str, Callable[..., Task]] = {"prior": prior_task, "decoder": decoder_task, "upsampler": upsampler_task,
                                         "clip": clip_task}


def make_task(cfg, **kwargs: Any) -> Task:
  """The Task for `cfg.stage` (see TASKS)."""
  if cfg.stage not in TASKS:
    raise ValueError(f"no trainer for stage {cfg.stage!r}; trainable stages: {sorted(TASKS)}")
  return TASKS[cfg.stage](cfg, **kwargs)
