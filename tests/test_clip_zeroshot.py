"""Zero-shot classification and CLIP-score reranking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from unclip_jax.convert import clip as convert_clip
from unclip_jax.data import tokenizer as tok_lib
from unclip_jax.models import clip as clip_lib
from unclip_jax.stages import clip as zs
from unclip_jax.stages import builders

TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30,
              patch_size=2, hidden_act="quick_gelu")


def test_zeroshot_logits_match_transformers_logits_per_image(tmp_path):
  torch.manual_seed(0)
  hf = transformers.CLIPModel(transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24))
  with torch.no_grad():
    for p in hf.parameters():
      p.normal_(0.0, 0.2)
  hf.eval().save_pretrained(tmp_path)
  cfg, params = convert_clip.load_hf_clip(str(tmp_path))
  model = clip_lib.CLIP(cfg)
  rng = np.random.default_rng(0)
  rows = {f"class{k}": np.concatenate([[0], rng.integers(3, 98, 6), [98], np.ones(8, int)]) for k in range(3)}
  fake_tokenize = lambda prompts: (np.stack([rows[p] for p in prompts]), None)      # prompt -> fixed id row
  classifier = zs.build_zeroshot_classifier(zs.make_text_encoder(model, params), fake_tokenize, list(rows), ["{}"],
                                            batch_size=2)
  px = rng.standard_normal((2, 3, 30, 30)).astype(np.float32)
  image_embeds = zs.make_image_encoder(model, params)(px.transpose(0, 2, 3, 1))
  got = zs.zeroshot_logits(image_embeds, classifier, scale=jnp.exp(params["logit_scale"]))
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(np.stack(list(rows.values()))), pixel_values=torch.tensor(px)).logits_per_image
  err = float(np.max(np.abs(np.asarray(got) - want.numpy())))
  print(f"zero-shot logits vs logits_per_image: max|Δ| = {err:.2e}")
  assert err < 1e-4


def test_class_embedding_is_normalized_mean_of_normalized_templates():
  e = np.random.default_rng(1).standard_normal((3, 4, 8)).astype(np.float32) * np.array([1, 5, 0.1, 2])[None, :, None]
  n = e / np.linalg.norm(e, axis=-1, keepdims=True)
  want = n.mean(1) / np.linalg.norm(n.mean(1), axis=-1, keepdims=True)
  np.testing.assert_allclose(zs.class_embeddings(jnp.asarray(e)), want, rtol=1e-5, atol=1e-6)


def test_classifier_picks_the_matching_class():
  """Tiny random CLIP + the real tokenizer: an image embedding built from a class's prompt embedding gets that class."""
  cfg = clip_lib.CLIPConfig(
      text=clip_lib.TextConfig(vocab_size=49408, width=32, layers=1, heads=4, mlp_dim=37, context_length=77),
      vision=None, projection_dim=16, logit_scale=False)
  model = clip_lib.CLIP(cfg)
  params = builders.init_clip(model, jax.random.key(0))
  tok = tok_lib.CLIPTokenizer()
  encode = zs.make_text_encoder(model, params)
  classes = ["cat", "dog", "sports car", "oak tree", "teapot"]
  templates = ("a photo of a {}.", "a drawing of a {}.")
  classifier = zs.build_zeroshot_classifier(encode, tok.tokenize, classes, templates, batch_size=3)
  assert classifier.shape == (5, 16)
  np.testing.assert_allclose(np.linalg.norm(classifier, axis=-1), 1.0, rtol=1e-5)
  # "images" whose embeddings are the (scaled) prompt embeddings of a permutation of the classes
  perm = [3, 0, 4, 1, 2]
  ids, _ = tok.tokenize([f"a photo of a {classes[k]}." for k in perm])
  image_embeds = 3.0 * np.asarray(encode(ids))
  pred, probs = zs.zeroshot_classify(jnp.asarray(image_embeds), classifier)
  assert pred.tolist() == perm
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_rerank_orders_by_clip_score():
  rng = np.random.default_rng(2)
  b, n, e = 2, 5, 8
  text = rng.standard_normal((b, e)).astype(np.float32)
  cosines = np.array([[0.1, 0.9, -0.3, 0.5, 0.7], [0.2, -0.1, 0.0, 0.95, 0.4]], np.float32)
  t_hat = text / np.linalg.norm(text, axis=-1, keepdims=True)
  u = rng.standard_normal((b, n, e)).astype(np.float32)
  u -= np.einsum("bne,be->bn", u, t_hat)[..., None] * t_hat[:, None]               # orthogonal to the text
  u /= np.linalg.norm(u, axis=-1, keepdims=True)
  lengths = rng.uniform(0.5, 3, (b, n, 1))                                           # scores ignore the norm
  cands = (cosines[..., None] * t_hat[:, None] + np.sqrt(1 - cosines ** 2)[..., None] * u) * lengths
  np.testing.assert_allclose(zs.clip_scores(text, cands), 100 * cosines, atol=1e-4)
  order, scores = zs.rerank(jnp.asarray(text), jnp.asarray(cands.astype(np.float32)))
  assert order.tolist() == np.argsort(-cosines, axis=-1).tolist()
  np.testing.assert_allclose(scores, np.take_along_axis(100 * cosines, np.asarray(order), -1), atol=1e-4)


def test_bad_inputs():
  enc = lambda ids: np.zeros((len(ids), 4))
  with pytest.raises(ValueError, match="classnames is empty"):
    zs.build_zeroshot_classifier(enc, lambda p: (p, None), [])
  with pytest.raises(ValueError, match="placeholder"):
    zs.build_zeroshot_classifier(enc, lambda p: (p, None), ["cat"], ["no placeholder"])
  with pytest.raises(ValueError, match=r"candidates \[B, N, E\]"):
    zs.clip_scores(jnp.zeros((2, 4)), jnp.zeros((2, 4)))
