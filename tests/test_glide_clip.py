"""The unCLIP paper's decoder conditioning (text_encoder "glide_clip", models/glide_clip.py): GLIDE's transformer
tokens followed by 4 tokens projected from the CLIP image embedding, the embedding added to the time embedding;
guidance rows (learned null image embedding, empty caption); caption tokens cut/padded to text_ctx; its loss
trains every part, and a text-only decoder ignores the image embedding."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import config_lib
from unclip_jax.models import glide_text
from unclip_jax.stages import decoder

B, L = 3, 12


@pytest.fixture(scope="module")
def stage():
  cfg = config_lib.load_config("decoder:tiny", ["model.text_encoder=glide_clip", "dtype='float32'"])
  models = decoder.build(cfg)
  params = decoder.init_params(models, jax.random.key(0))
  # non-zero null embedding so that dropping the image embedding is visible
  params["text_encoder"]["learned_null_image_embedding"] = jnp.linspace(-1, 1, cfg.model.clip_embedding_dim)
  return cfg, models, params


def _inputs(cfg, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.arange(L)[None] < np.array([[3], [7], [12]])
  tokens = np.where(mask, rng.integers(0, cfg.model.n_vocab - 1, (B, L)), 0).astype(np.int32)
  return (jnp.asarray(rng.standard_normal((B, cfg.model.clip_embedding_dim)), jnp.float32), jnp.asarray(tokens),
          jnp.asarray(mask))


def test_tokens_are_the_transformer_outputs_then_the_clip_tokens(stage):
  cfg, models, params = stage
  enc, p = models.text_encoder, params["text_encoder"]
  image_emb, tokens, mask = _inputs(cfg)
  t, m = decoder.fit_tokens(tokens, mask, cfg.model.text_ctx, enc.text_encoder.end_token)
  out = enc.apply({"params": p}, t, m, image_emb)
  xf_proj, xf_out = enc.text_encoder.apply({"params": p["text_encoder"]}, t, m)
  ctx, w, n = cfg.model.text_ctx, cfg.model.xf_width, cfg.model.clip_extra_context_tokens
  assert out["encoder_hidden_states"].shape == (B, ctx + n, w) and out["attention_mask"] is None
  np.testing.assert_allclose(out["encoder_hidden_states"][:, :ctx], xf_out, rtol=1e-6)
  # the extra tokens depend on the image embedding alone; the time embedding is xf_proj + a projection of it
  other = enc.apply({"params": p}, t, m, image_emb * 2.0)
  np.testing.assert_allclose(other["encoder_hidden_states"][:, :ctx], xf_out, rtol=1e-6)
  assert not np.allclose(other["encoder_hidden_states"][:, ctx:], out["encoder_hidden_states"][:, ctx:])
  k = p["clip_time_proj"]
  np.testing.assert_allclose(out["class_labels"], xf_proj + image_emb @ k["kernel"] + k["bias"], rtol=1e-5, atol=1e-6)
  tok = p["clip_tokens_proj"]
  np.testing.assert_allclose(out["encoder_hidden_states"][:, ctx:],
                             (image_emb @ tok["kernel"] + tok["bias"]).reshape(B, n, w), rtol=1e-5, atol=1e-6)


def test_dropped_rows_get_the_learned_null_image_embedding(stage):
  cfg, models, params = stage
  enc, p = models.text_encoder, params["text_encoder"]
  image_emb, tokens, mask = _inputs(cfg)
  t, m = decoder.fit_tokens(tokens, mask, cfg.model.text_ctx, enc.text_encoder.end_token)
  drop = jnp.array([True, False, True])
  a = enc.apply({"params": p}, t, m, image_emb, drop)
  b = enc.apply({"params": p}, t, m, -image_emb, drop)
  null = enc.apply({"params": p}, t, m, jnp.tile(p["learned_null_image_embedding"][None], (B, 1)))
  for key in ("encoder_hidden_states", "class_labels"):
    np.testing.assert_allclose(a[key][drop], null[key][drop], rtol=1e-6)
    np.testing.assert_allclose(a[key][drop], b[key][drop], rtol=1e-6)
    assert not np.allclose(a[key][~drop], b[key][~drop])
  with pytest.raises(ValueError, match=r"image_emb must be \[3, 32\]"):
    enc.apply({"params": p}, t, m, image_emb[:2])


def test_fit_tokens_cuts_and_pads_like_glide():
  tokens, mask = jnp.arange(1, 7, dtype=jnp.int32).reshape(2, 3), jnp.array([[True, True, False], [True] * 3])
  t, m = decoder.fit_tokens(tokens, mask, 5, 99)
  np.testing.assert_array_equal(t, [[1, 2, 3, 99, 99], [4, 5, 6, 99, 99]])
  np.testing.assert_array_equal(m, [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
  t, m = decoder.fit_tokens(tokens, mask, 2, 99)
  np.testing.assert_array_equal(t, [[1, 2], [4, 5]])
  ids, want_mask = glide_text.padded_tokens_and_mask([[1, 2], [4, 5, 6]], 5, 99)   # GLIDE's own host-side padding
  np.testing.assert_array_equal(decoder.fit_tokens(tokens, mask, 5, 99)[1], want_mask)
  with pytest.raises(ValueError, match="both be"):
    decoder.fit_tokens(tokens, mask[:, :2], 5, 99)


@pytest.mark.parametrize("branches", [1, 2, 3])
def test_guidance_rows(stage, branches):
  """[uncond; (image only;) cond]: uncond = null image + empty caption, image only = image + empty caption."""
  cfg, models, params = stage
  enc, p = models.text_encoder, params["text_encoder"]
  image_emb, tokens, mask = _inputs(cfg)
  kw = decoder.glide_clip_cond(enc, p, image_emb=image_emb, tokens=tokens, text_mask=mask, guidance=branches)
  t, m = decoder.fit_tokens(tokens, mask, cfg.model.text_ctx, enc.text_encoder.end_token)
  end = enc.text_encoder.end_token
  empty_t, empty_m = jnp.full_like(t, end), jnp.zeros_like(m)
  null = jnp.tile(p["learned_null_image_embedding"][None], (B, 1))
  want = {"cond": enc.apply({"params": p}, t, m, image_emb),
          "uncond": enc.apply({"params": p}, empty_t, empty_m, null),
          "image": enc.apply({"params": p}, empty_t, empty_m, image_emb)}
  layout = {1: ["cond"], 2: ["uncond", "cond"], 3: ["uncond", "image", "cond"]}[branches]
  assert kw["encoder_hidden_states"].shape[0] == branches * B
  for i, name in enumerate(layout):
    for key in ("encoder_hidden_states", "class_labels"):
      np.testing.assert_allclose(kw[key][i * B:(i + 1) * B], want[name][key], rtol=1e-5, atol=1e-6)
  text_only = decoder.glide_clip_cond(enc, p, image_emb=image_emb, tokens=tokens, text_mask=mask,
                                      guidance=branches, image_conditioning=False)
  np.testing.assert_allclose(text_only["class_labels"][-B:],
                             enc.apply({"params": p}, t, m, null)["class_labels"], rtol=1e-5, atol=1e-6)


def test_loss_trains_every_part_and_the_stage_sampler_runs(stage):
  cfg, models, params = stage
  image_emb, tokens, mask = _inputs(cfg)
  batch = {"image": jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (B, 16, 16, 3)), jnp.float32),
           "image_emb": image_emb, "tokens": tokens, "text_mask": mask}
  loss = functools.partial(decoder.loss_fn_glide_clip, unet=models.unet, encoder=models.text_encoder,
                           diffusion=models.diffusion, clip_drop_prob=0.0, text_drop_prob=0.0)
  # the UNet's zero-initialised output layers (ADM) pass no gradient upstream at init: random UNet weights here
  leaves, tree = jax.tree.flatten(params["unet"])
  keys = jax.random.split(jax.random.key(6), len(leaves))
  unet = jax.tree.unflatten(tree, [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  grads = jax.jit(jax.grad(lambda p: loss(p, batch, jax.random.key(2))[0]))(dict(params, unet=unet))
  norm = lambda tree: float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))
  enc = grads["text_encoder"]
  for part in (grads["unet"], enc["text_encoder"]["transformer"], enc["clip_time_proj"], enc["clip_tokens_proj"]):
    assert norm(part) > 0
  assert norm(enc["learned_null_image_embedding"]) == 0          # no row dropped
  # a text-only decoder never sees the image embedding
  text_only = functools.partial(loss, image_conditioning=False)
  a = text_only(params, batch, jax.random.key(3))[0]
  b = text_only(params, dict(batch, image_emb=-image_emb), jax.random.key(3))[0]
  assert float(a) == float(b)
  sampler = decoder.make_sampler(cfg, models.unet, None, models.diffusion)
  kw = decoder.glide_clip_cond(models.text_encoder, params["text_encoder"], image_emb=image_emb, tokens=tokens,
                               text_mask=mask, guidance=decoder.settings_for(cfg).branches)
  images = sampler(params, kw, jax.random.normal(jax.random.key(4), (B, 16, 16, 3)), jax.random.key(5))
  assert images.shape == (B, 16, 16, 3) and bool(jnp.all(jnp.isfinite(images)))
