"""The prior learns: trained on synthetic paired (text, image) embeddings, its samples beat trivial baselines."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unclip_jax.stages import prior as prior_lib
from unclip_jax.diffusion import samplers
from unclip_jax.diffusion.gaussian import GaussianDiffusion
from unclip_jax.diffusion.schedules import NoiseSchedule
from unclip_jax.models import prior as prior_model
from unclip_jax.stages import builders

from helpers import PAIR_E, PAIR_L, make_pairs, unit

E, L = PAIR_E, PAIR_L


def test_prior_learns_synthetic_mapping():
  start = time.time()
  model = prior_model.PriorTransformer(embedding_dim=E, num_embeddings=L, num_layers=2, num_heads=4, head_dim=16)
  diffusion = GaussianDiffusion(NoiseSchedule.create("cosine", 1000), prediction="x0", variance="fixed_small_log")
  train, test = make_pairs(2048, 0), make_pairs(64, 1)
  params = builders.init_prior(model, jax.random.key(0))
  params = prior_lib.with_clip_stats(params, *prior_lib.stats_from_embeddings(train["image_emb"]))
  # Adam, no weight decay on the CLIP statistics (they also get zero gradient).
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(optax.cosine_decay_schedule(3e-3, 300, 0.05)))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, idx, rng):
    batch = jax.tree.map(lambda x: x[idx], train)
    (loss, metrics), grads = jax.value_and_grad(prior_lib.loss_fn, has_aux=True)(
        params, batch, rng, model=model, diffusion=diffusion, text_drop_prob=0.1)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics, grads

  rng = np.random.default_rng(0)
  losses = []
  for i in range(300):
    idx = jnp.asarray(rng.integers(0, 2048, 64))
    params, opt_state, metrics, grads = step(params, opt_state, idx, jax.random.key(i))
    losses.append(float(metrics["mse"]))
  assert float(jnp.abs(grads["clip_mean"]).max()) == 0.0 and float(jnp.abs(grads["clip_std"]).max()) == 0.0

  cond = prior_lib.TextCond(test["text_emb"], test["text_enc"], test["text_mask"])
  truth = np.asarray(test["image_emb"])
  results = {}
  for g in (1.0, 2.0):
    settings = samplers.SamplerSettings(method="ddpm", guidance_scale=g, clip_range=5.0)
    sampled = jax.jit(lambda p, c, r: prior_lib.sample(p, c, r, model=model, diffusion=diffusion, steps="25",
                                                       settings=settings, num_candidates=2))(
                                                           params, cond, jax.random.key(99))
    results[g] = float(np.mean(np.sum(unit(np.asarray(sampled)) * truth, -1)))
  base_text = float(np.mean(np.sum(unit(np.asarray(test["text_emb"])) * truth, -1)))
  base_mean = float(np.mean(truth @ unit(np.asarray(train["image_emb"]).mean(0))))
  print(f"\nprior learning: mse first50={np.mean(losses[:50]):.3f} last50={np.mean(losses[-50:]):.3f}; "
        f"cos(sample, true) g=1: {results[1.0]:.3f}, g=2: {results[2.0]:.3f}; baselines: text emb {base_text:.3f}, "
        f"mean image emb {base_mean:.3f}; {time.time() - start:.1f}s")
  assert np.mean(losses[-50:]) < 0.5 * np.mean(losses[:50])
  assert results[1.0] > base_mean + 0.1 and results[1.0] > base_text + 0.3
