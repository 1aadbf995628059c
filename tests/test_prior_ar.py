"""Autoregressive prior: PCA/quantisation round trips, causality, and a learning test on synthetic pairs."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unclip_jax.models.ar_prior import ARPrior
from unclip_jax.stages import ar_prior
from unclip_jax.stages import builders

from helpers import PAIR_E as E, PAIR_L as L, make_pairs, unit

K, V = 16, 16


def test_pca_and_quantizer_roundtrip():
  x = np.random.default_rng(0).standard_normal((500, 12)) @ np.diag(np.linspace(3, 0.01, 12))
  pca = ar_prior.PCA.fit(x, 12)
  assert abs(pca.variance_kept - 1.0) < 1e-5
  np.testing.assert_allclose(np.asarray(pca.decode(pca.encode(x))), x, atol=1e-4)
  pca6 = ar_prior.PCA.fit(x, 6)
  scales = np.linspace(3, 0.01, 12) ** 2
  assert abs(pca6.variance_kept - scales[:6].sum() / scales.sum()) < 0.03
  assert np.all(np.diff(pca6.explained_variance) <= 0)
  z = np.asarray(pca.encode(x))
  q = ar_prior.Quantizer.fit(z, 1024, quantile=0.0)
  codes = np.asarray(q.encode(z))
  assert codes.min() >= 0 and codes.max() <= 1023
  width = (q.high - q.low) / 1024
  assert np.all(np.abs(np.asarray(q.decode(codes)) - z) <= width / 2 + 1e-5)
  with pytest.raises(ValueError, match="num_components"):
    ar_prior.PCA.fit(x, 13)


def test_ar_prior_is_causal_and_checks_inputs():
  model = ARPrior(vocab_size=50, embedding_dim=E, text_len=L, num_components=K, num_buckets=V,
                           num_dot_buckets=V, width=32, num_layers=1, num_heads=4)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 50, (2, L)))
  mask = jnp.asarray(np.arange(L)[None] < np.array([[3], [L]]))
  emb = jnp.asarray(rng.standard_normal((2, E)), jnp.float32)
  dot = jnp.array([3, V])
  codes = jnp.asarray(rng.integers(0, V, (2, K - 1)))
  params = builders.init_ar_prior(model, jax.random.key(0))
  apply = jax.jit(model.apply)
  out = apply({"params": params}, tokens, mask, emb, dot, codes)
  assert out.shape == (2, K, V)
  codes2 = codes.at[:, 10:].set(0)           # changing codes >= 10 cannot change predictions of codes <= 10
  out2 = apply({"params": params}, tokens, mask, emb, dot, codes2)
  np.testing.assert_allclose(np.asarray(out2[:, :11]), np.asarray(out[:, :11]), atol=1e-6)
  assert np.abs(np.asarray(out2[:, 11:] - out[:, 11:])).max() > 1e-4
  tokens3 = tokens.at[0, 5:].set(7)          # padded caption tokens are ignored
  out3 = apply({"params": params}, tokens3, mask, emb, dot, codes)
  np.testing.assert_allclose(np.asarray(out3), np.asarray(out), atol=1e-6)
  with pytest.raises(ValueError, match="text_emb must be"):
    model.apply({"params": params}, tokens, mask, emb[:, :5], dot, codes)
  with pytest.raises(ValueError, match="text_mask"):
    model.apply({"params": params}, tokens, None, emb, dot, codes)


@pytest.mark.slow
def test_ar_prior_learns_synthetic_mapping():
  """~30 s on one CPU core: 400 Adam steps, then guided sampling of 64 test pairs."""
  start = time.time()
  train, test = make_pairs(2048, 0), make_pairs(64, 1)
  rng = np.random.default_rng(0)
  train["tokens"] = jnp.asarray(rng.integers(0, 50, (2048, L)))
  test["tokens"] = jnp.asarray(rng.integers(0, 50, (64, L)))
  img = np.asarray(train["image_emb"])
  pca = ar_prior.PCA.fit(img, K)
  quant = ar_prior.Quantizer.fit(np.asarray(pca.encode(img)), V)
  dotq = ar_prior.DotQuantizer.fit(np.asarray(train["text_emb"]), img, V)
  model = ARPrior(vocab_size=50, embedding_dim=E, text_len=L, num_components=K, num_buckets=V,
                           num_dot_buckets=V, width=64, num_layers=2, num_heads=4)
  params = builders.init_ar_prior(model, jax.random.key(0))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(optax.cosine_decay_schedule(3e-3, 400, 0.05)))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, idx, key):
    batch = {k: train[k][idx] for k in ("tokens", "text_mask", "text_emb", "image_emb")}
    (loss, metrics), grads = jax.value_and_grad(ar_prior.loss_fn, has_aux=True)(
        params, batch, key, model=model, pca=pca, quantizer=quant, dot_quantizer=dotq, text_drop_prob=0.1)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  hist = []
  for i in range(400):
    params, opt_state, metrics = step(params, opt_state, jnp.asarray(rng.integers(0, 2048, 64)), jax.random.key(i))
    hist.append((float(metrics["loss"]), float(metrics["code_acc"])))
  truth = np.asarray(test["image_emb"])
  bucket = dotq.bucket_for_quantile(0.75)
  cos = {}
  for g in (1.0, 2.0):
    emb, codes = jax.jit(lambda p, key: ar_prior.sample(
        p, test["tokens"], test["text_mask"], test["text_emb"], key, model=model, pca=pca, quantizer=quant,
        dot_bucket=bucket, null_index=dotq.null_index, guidance_scale=g, temperature=1.0))(params, jax.random.key(5))
    cos[g] = float(np.mean(np.sum(unit(np.asarray(emb)) * truth, -1)))
  ceiling = float(np.mean(np.sum(unit(np.asarray(pca.decode(quant.decode(quant.encode(pca.encode(truth)))))) * truth,
                                 -1)))
  base_mean = float(np.mean(truth @ unit(img.mean(0))))
  print(f"\nAR prior: PCA {K}/{E} comps keep {pca.variance_kept:.1%} variance; "
        f"CE first50={np.mean(hist[:50], 0)[0]:.2f}"
        f" last50={np.mean(hist[-50:], 0)[0]:.2f} (uniform {np.log(V):.2f}), code acc {np.mean(hist[-50:], 0)[1]:.2f};"
        f" cos(sample, true) g=1 {cos[1.0]:.3f}, g=2 {cos[2.0]:.3f}; PCA+quant ceiling {ceiling:.3f};"
        f" mean-emb baseline {base_mean:.3f}; {time.time() - start:.1f}s")
  assert np.mean(hist[-50:], 0)[0] < np.mean(hist[:50], 0)[0] - 0.5
  assert cos[1.0] > base_mean + 0.1
