"""CLIP as an evaluator: zero-shot classification and reranking of candidate images by CLIP score.

  class embedding  c_k = l2norm(mean_j l2norm(text_embed(template_j.format(class_k))))      # [C, E]
  zero-shot logits = scale · l2norm(image_embeds) c̃ᵀ                                       # [B, C]
  CLIP score       = 100 · cos(text_embed, image_embed)                                     # reranking key

Text encoding goes through a caller-supplied `encode_text(ids [N, T]) -> [N, E]` (e.g. `make_text_encoder`), so the
functions work with any CLIP size and sharding; everything here is host-side glue around jitted calls plus small
pure functions that can be jitted themselves.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.models import clip as clip_lib
from unclip_jax.models.clip_losses import l2_normalize

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


def make_text_encoder(model: clip_lib.CLIP, params) -> EncodeFn:
  """Jitted `ids [N, T] int -> text_embeds [N, E]` (unnormalized) for a CLIP with a text tower."""
  fn = jax.jit(lambda p, ids: model.apply({"params": p}, ids, method=model.encode_text)[0])
  return lambda ids: fn(params, jnp.asarray(ids, jnp.int32))


def make_image_encoder(model: clip_lib.CLIP, params) -> EncodeFn:
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
