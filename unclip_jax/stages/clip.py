"""The CLIP stage (Radford et al. 2021): contrastive training of the text and image towers, and CLIP as an evaluator.

Everything about the stage but the Linen module (`models/clip.py`): building it from the config, the loss and the
training task, zero-shot classification and the reranking of candidate images by CLIP score.

Contrastive loss: symmetric InfoNCE with a learnable temperature, single-device and global-batch sharded.

  t, i   = l2norm(text_embeds), l2norm(image_embeds)                      # [B, E]
  scale  = exp(min(logit_scale, log(max_scale)))                           # temperature, clamped so scale <= 100
  logits = scale · t iᵀ                                                    # [B, B], positives on the diagonal
  loss   = ½ (CE(logits, arange B) + CE(logitsᵀ, arange B))                # mean over the global batch

The sharded version runs under `jax.shard_map` over the batch axes ('data', 'fsdp'): every device all-gathers the
(normalized) embeddings of the global batch, computes only its local rows of both logit matrices
([b, B] text->image and [b, B] image->text), and the per-row losses are summed with `psum` and divided by 2B. It
equals the single-device loss on the gathered batch, and so do its gradients (the all-gather transposes to a
reduce-scatter). Memory per device is O(b·B), never O(B²).

CLIP as an evaluator:
  class embedding  c_k = l2norm(mean_j l2norm(text_embed(template_j.format(class_k))))      # [C, E]
  zero-shot logits = scale · l2norm(image_embeds) c̃ᵀ                                       # [B, C]
  CLIP score       = 100 · cos(text_embed, image_embed)                                     # reranking key
Text encoding goes through a caller-supplied `encode_text(ids [N, T]) -> [N, E]` (e.g. `make_text_encoder`).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from unclip_jax.models.clip import CLIP
from unclip_jax.stages import builders, common
from unclip_jax.stages.common import Task

Params = Any


class Models(NamedTuple):
  """The CLIP stage's module."""
  clip: CLIP


def build(cfg, *, dtype=None) -> Models:
  """The stage's module from a `configs/clip.py` config (dtype: default the config's compute dtype)."""
  return Models(builders.clip(cfg.model, dtype=dtype or cfg.dtype, remat=cfg.remat_policy))


def init_params(models: Models, rng: jax.Array) -> Params:
  return builders.init_clip(models.clip, rng)


def abstract_params(cfg) -> Params:
  """Shapes/dtypes of the stage's params (nothing allocated)."""
  return builders.abstract(init_params, build(cfg, dtype="float32"))


# ---- contrastive loss ---------------------------------------------------------------------------------------------
DEFAULT_MAX_SCALE = 100.0
BATCH_AXES = ("data", "fsdp")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """[..., E] -> unit vectors along the last axis (float32)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def temperature(logit_scale: jax.Array, max_scale: float = DEFAULT_MAX_SCALE) -> jax.Array:
  """exp(logit_scale) clamped to <= max_scale (OpenAI CLIP clamps the parameter at log(100)); no gradient past it."""
  return jnp.exp(jnp.minimum(jnp.asarray(logit_scale, jnp.float32), math.log(max_scale)))


def _row_losses(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Cross-entropy per row.  logits [b, B], labels [b] int -> [b]."""
  picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  return jax.nn.logsumexp(logits, axis=-1) - picked


def contrastive_logits(text_embeds: jax.Array, image_embeds: jax.Array, logit_scale: jax.Array,
                       max_scale: float = DEFAULT_MAX_SCALE) -> jax.Array:
  """logits_per_text [Bt, Bi] = temperature · cos(text, image) (HF `CLIPModel.logits_per_text`)."""
  return temperature(logit_scale, max_scale) * l2_normalize(text_embeds) @ l2_normalize(image_embeds).T


def contrastive_loss(text_embeds: jax.Array, image_embeds: jax.Array, logit_scale: jax.Array,
                     max_scale: float = DEFAULT_MAX_SCALE) -> jax.Array:
  """Single-device symmetric InfoNCE.

  Args:
    text_embeds, image_embeds: [B, E] unnormalized; row k of each is a positive pair.
    logit_scale: [] the learnable log temperature (CLIP init log(1/0.07)).
  Returns:
    [] float32 loss.
  """
  logits = contrastive_logits(text_embeds, image_embeds, logit_scale, max_scale)       # [B, B]
  labels = jnp.arange(logits.shape[0])
  return 0.5 * (jnp.mean(_row_losses(logits, labels)) + jnp.mean(_row_losses(logits.T, labels)))


def sharded_contrastive_loss(text_embeds: jax.Array, image_embeds: jax.Array, logit_scale: jax.Array,
                             mesh: jax.sharding.Mesh, *, batch_axes: Sequence[str] = BATCH_AXES,
                             max_scale: float = DEFAULT_MAX_SCALE) -> jax.Array:
  """Global-batch symmetric InfoNCE under `jax.shard_map`; same value and gradients as `contrastive_loss`.

  Args:
    text_embeds, image_embeds: [B, E] global arrays, batch sharded over `batch_axes` (B divisible by their size).
    logit_scale: [] replicated.
    mesh: the training mesh (Auto axes); axes not in `batch_axes` just replicate the computation.
  Returns:
    [] float32 loss, replicated.
  """
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  if not axes:
    raise ValueError(f"none of the batch axes {tuple(batch_axes)} is in the mesh {mesh.axis_names}")
  n_shards = math.prod(mesh.shape[a] for a in axes)
  if text_embeds.shape != image_embeds.shape or text_embeds.ndim != 2:
    raise ValueError(f"text/image embeddings must both be [B, E], got {text_embeds.shape} and {image_embeds.shape}")
  if text_embeds.shape[0] % n_shards:
    raise ValueError(f"global batch {text_embeds.shape[0]} is not divisible by the {n_shards} shards of {axes}")
  global_batch = text_embeds.shape[0]

  def local(t, i, scale):                                                            # t, i: [b, E]
    t, i = l2_normalize(t), l2_normalize(i)
    all_t = jax.lax.all_gather(t, axes, tiled=True)                                  # [B, E]
    all_i = jax.lax.all_gather(i, axes, tiled=True)                                  # [B, E]
    temp = temperature(scale, max_scale)
    b = t.shape[0]
    labels = jax.lax.axis_index(axes) * b + jnp.arange(b)                            # global row ids [b]
    per_text = _row_losses(temp * t @ all_i.T, labels)                               # [b] text -> images
    per_image = _row_losses(temp * i @ all_t.T, labels)                              # [b] image -> texts
    return jax.lax.psum(jnp.sum(per_text) + jnp.sum(per_image), axes) / (2 * global_batch)

  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P()), out_specs=P(), check_vma=True)
  return fn(text_embeds, image_embeds, jnp.asarray(logit_scale, jnp.float32))


# ---- CLIP as an evaluator: zero-shot classification and reranking ------------------------------------------------
CLIP_SCORE_SCALE = 100.0
# A few of the prompt templates used for CLIP zero-shot ImageNet evaluation.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a drawing of a {}.",
)

EncodeFn = Callable[[np.ndarray], jax.Array]


def make_text_encoder(model: CLIP, params) -> EncodeFn:
  """Jitted `ids [N, T] int -> text_embeds [N, E]` (unnormalized) for a CLIP with a text tower."""
  fn = jax.jit(lambda p, ids: model.apply({"params": p}, ids, method=model.encode_text)[0])
  return lambda ids: fn(params, jnp.asarray(ids, jnp.int32))


def make_image_encoder(model: CLIP, params) -> EncodeFn:
  """Jitted `pixels [N, H, W, C] -> image_embeds [N, E]` (unnormalized)."""
  fn = jax.jit(lambda p, px: model.apply({"params": p}, px, method=model.encode_image)[0])
  return lambda px: fn(params, jnp.asarray(px, jnp.float32))


def class_embeddings(template_embeds: jax.Array) -> jax.Array:
  """[C, K, E] text embeddings of K templates per class -> [C, E] normalized mean of the normalized embeddings."""
  return l2_normalize(jnp.mean(l2_normalize(template_embeds), axis=1))


def build_zeroshot_classifier(encode_text: EncodeFn, tokenize: Callable, classnames: Sequence[str],
                              templates: Sequence[str] = DEFAULT_TEMPLATES, *, batch_size: int = 256) -> jax.Array:
  """Encodes every (class, template) prompt and averages per class.

  Args:
    encode_text: ids [N, T] -> text_embeds [N, E].
    tokenize: prompts -> (ids [N, T], mask) (e.g. `data.tokenizer.CLIPTokenizer(...).tokenize`).
    classnames: C names; templates: K format strings with one `{}`.
  Returns:
    [C, E] float32 unit-norm class embeddings.
  """
  if not classnames:
    raise ValueError("classnames is empty")
  if not templates or any("{}" not in t for t in templates):
    raise ValueError(f"every template needs one '{{}}' placeholder, got {list(templates)}")
  prompts = [t.format(c) for c in classnames for t in templates]
  chunks = []
  for start in range(0, len(prompts), batch_size):
    ids, _ = tokenize(prompts[start:start + batch_size])
    chunks.append(np.asarray(encode_text(ids), np.float32))
  embeds = np.concatenate(chunks).reshape(len(classnames), len(templates), -1)       # [C, K, E]
  return class_embeddings(jnp.asarray(embeds))


def zeroshot_logits(image_embeds: jax.Array, classifier: jax.Array,
                    scale: float | jax.Array = CLIP_SCORE_SCALE) -> jax.Array:
  """[B, E] image embeddings (unnormalized), [C, E] classifier -> [B, C] scale · cosine."""
  return scale * l2_normalize(image_embeds) @ l2_normalize(classifier).T


def zeroshot_classify(image_embeds: jax.Array, classifier: jax.Array,
                      scale: float | jax.Array = CLIP_SCORE_SCALE) -> tuple[jax.Array, jax.Array]:
  """Returns (predicted class [B] int32, probabilities [B, C] = softmax of the logits)."""
  logits = zeroshot_logits(image_embeds, classifier, scale)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32), jax.nn.softmax(logits, axis=-1)


def clip_scores(text_embeds: jax.Array, image_embeds: jax.Array) -> jax.Array:
  """CLIP score 100·cos per candidate.

  Args:
    text_embeds: [B, E] (one prompt per row).
    image_embeds: [B, N, E] (N candidate images per prompt).
  Returns:
    [B, N] float32.
  """
  if image_embeds.ndim != 3 or text_embeds.ndim != 2 or image_embeds.shape[0] != text_embeds.shape[0]:
    raise ValueError(f"expected text [B, E] and candidates [B, N, E], got {text_embeds.shape} and "
                     f"{image_embeds.shape}")
  return CLIP_SCORE_SCALE * jnp.einsum("be,bne->bn", l2_normalize(text_embeds), l2_normalize(image_embeds))


def rerank(text_embeds: jax.Array, image_embeds: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Orders candidates best-first by CLIP score (the unCLIP/DALL-E 2 reranking step).

  Args:
    text_embeds: [B, E]; image_embeds: [B, N, E].
  Returns:
    order [B, N] int32 candidate indices, best first (stable for ties); scores [B, N] in that order.
  """
  scores = clip_scores(text_embeds, image_embeds)
  order = jnp.argsort(-scores, axis=-1, stable=True).astype(jnp.int32)
  return order, jnp.take_along_axis(scores, order, axis=-1)


# ---- the training task --------------------------------------------------------------------------------------------
def loss_fn(params, batch, rng, *, model: CLIP, mesh):
  """Symmetric InfoNCE over the global batch; `pixels` [B, H, W, 3] CLIP-normalised, `ids` [B, T] int32."""
  del rng
  out = model.apply({"params": params}, input_ids=batch["ids"], pixels=batch["pixels"])
  if mesh is None:
    loss = contrastive_loss(out["text_embeds"], out["image_embeds"], out["logit_scale"])
  else:
    loss = sharded_contrastive_loss(out["text_embeds"], out["image_embeds"], out["logit_scale"], mesh)
  return loss, {"loss": loss, "temperature": jnp.exp(out["logit_scale"])}


def clip_batch(batch: dict, *, context_length: int) -> dict:
  """Host-side: captions -> token ids, images in [-1, 1] -> CLIP-normalised pixels."""
  from unclip_jax.data import image_processing, tokenizer

  ids, _ = tokenizer.tokenize(list(batch["caption"]), context_length=context_length)
  mean = np.asarray(image_processing.OPENAI_CLIP_MEAN, np.float32)
  std = np.asarray(image_processing.OPENAI_CLIP_STD, np.float32)
  pixels = ((np.asarray(batch["image"], np.float32) + 1.0) / 2.0 - mean) / std
  return {"ids": np.asarray(ids, np.int32), "pixels": pixels.astype(np.float32)}


def make_task(cfg, *, data: Iterator[dict] | None = None, eval_data: Iterator[dict] | None = None,
              mesh=None) -> Task:
  """CLIP on image-caption datasets; the loss is sharded over the mesh's batch axes when `mesh` is given.
  Evaluation: in-batch retrieval top-1 both ways and the matched cosine."""
  model = build(cfg).clip
  size = cfg.model.vision.image_size
  data = data if data is not None else common.data_iterator(cfg, size)
  to_clip = functools.partial(clip_batch, context_length=cfg.model.text.context_length)
  evaluate = None
  held = common.eval_batch(cfg, eval_data, size, ("image", "caption"))
  if held is not None:
    held = to_clip(held)

    @jax.jit
    def evaluate(params):
      """In-batch retrieval: is each image's own caption the best-scoring one (and vice versa)?"""
      out = model.apply({"params": params}, input_ids=held["ids"], pixels=held["pixels"])
      sims = common.cosine(out["image_embeds"][:, None], out["text_embeds"][None])               # [N, N]
      labels = jnp.arange(sims.shape[0])
      return {"image_to_text_top1": jnp.mean(jnp.argmax(sims, 1) == labels),
              "text_to_image_top1": jnp.mean(jnp.argmax(sims, 0) == labels),
              "matched_cosine": jnp.mean(jnp.diag(sims))}

  return Task(init_params=lambda rng: init_params(Models(model), rng),
              loss_fn=functools.partial(loss_fn, model=model, mesh=mesh),
              data=common.MappedIterator(data, to_clip), evaluate=evaluate)
