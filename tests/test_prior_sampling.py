"""Prior sampling loop vs the prior stage of diffusers' UnCLIPPipeline, same latents and the same step noise."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
import diffusers.schedulers.scheduling_unclip as scheduling_unclip  # noqa: E402

from unclip_jax.stages import prior as prior_lib  # noqa: E402
from unclip_jax.convert import prior as convert_prior  # noqa: E402
from unclip_jax.diffusion import samplers  # noqa: E402
from unclip_jax.diffusion.gaussian import GaussianDiffusion  # noqa: E402
from unclip_jax.diffusion.schedules import NoiseSchedule  # noqa: E402
from unclip_jax.models import prior as prior_lib_model  # noqa: E402
from unclip_jax.stages import builders  # noqa: E402

from helpers import PRIOR_KW as TINY_KW, letters_tokenizer, make_torch_prior  # noqa: E402

B, E, L = 2, TINY_KW["embedding_dim"], TINY_KW["num_embeddings"]


def diffusers_prior_stage(prior, scheduler, latents, prompt_embeds, text_enc, text_mask, guidance_scale, steps,
                          noises):
  """The prior section of `UnCLIPPipeline.__call__` (diffusers 0.42.1), with step noise taken from `noises`.

  Conditioning tensors arrive as [uncond; cond], as `_encode_prompt` returns them.
  """
  scheduler.set_timesteps(steps)
  timesteps = scheduler.timesteps
  cfg = guidance_scale > 1.0
  calls = []

  def fake_randn(shape, generator=None, device=None, dtype=None, **kw):
    calls.append(shape)
    return noises[len(calls) - 1].to(dtype=dtype)   # noise of this step index (steps with t > 0 draw in order)

  original = scheduling_unclip.randn_tensor
  scheduling_unclip.randn_tensor = fake_randn
  try:
    with torch.no_grad():
      for i, t in enumerate(timesteps):
        latent_model_input = torch.cat([latents] * 2) if cfg else latents
        pred = prior(latent_model_input, timestep=t, proj_embedding=prompt_embeds,
                     encoder_hidden_states=text_enc, attention_mask=text_mask).predicted_image_embedding
        if cfg:
          u, c = pred.chunk(2)
          pred = u + guidance_scale * (c - u)
        prev_timestep = None if i + 1 == timesteps.shape[0] else timesteps[i + 1]
        assert len(calls) == i or t == 0
        latents = scheduler.step(pred, timestep=t, sample=latents, generator=None,
                                 prev_timestep=prev_timestep).prev_sample
      out = prior.post_process_latents(latents)
  finally:
    scheduling_unclip.randn_tensor = original
  assert len(calls) == len(timesteps) - 1
  return out.numpy()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  torch_prior = make_torch_prior(3)
  d = tmp_path_factory.mktemp("prior_sampling")
  torch_prior.save_pretrained(d)
  cfg, params = convert_prior.load_diffusers(d)
  model = builders.prior(cfg)
  rng = np.random.default_rng(0)
  mask = np.arange(L)[None, :] < np.array([[6], [L]])
  cond = prior_lib.TextCond(jnp.asarray(rng.standard_normal((B, E)), jnp.float32),
                            jnp.asarray(rng.standard_normal((B, L, E)), jnp.float32), jnp.asarray(mask))
  null_mask = np.arange(L) < 2                                           # like CLIP(""): BOS, EOS
  null = prior_lib.TextCond(jnp.asarray(rng.standard_normal((E,)), jnp.float32),
                            jnp.asarray(rng.standard_normal((L, E)), jnp.float32), jnp.asarray(null_mask))
  return torch_prior, model, params, cond, null


@pytest.mark.parametrize("guidance_scale,steps,clip", [(4.0, 25, 5.0), (1.0, 7, 5.0), (4.0, 25, 0.5)])
def test_prior_sampling_matches_diffusers_pipeline(setup, guidance_scale, steps, clip):
  """Karlo settings (g=4, 25 steps, clamp ±5), unguided, and a ±0.5 clamp that the tiny model actually hits."""
  torch_prior, model, params, cond, null = setup
  diffusion = GaussianDiffusion(NoiseSchedule.create("cosine", 1000), prediction="x0", variance="fixed_small_log")
  settings = samplers.SamplerSettings(method="ddpm", guidance_scale=guidance_scale, clip_range=clip,
                                      single_step_beta="schedule")
  rng = jax.random.key(7)
  latent_rng, noise_rng = jax.random.split(rng)

  run = jax.jit(lambda p, c, r, n: prior_lib.sample(p, c, r, model=model, diffusion=diffusion, steps=str(steps),
                                                    settings=settings, num_candidates=1, null_cond=n))
  ours = np.asarray(run(params, cond, rng, null))

  x_T = np.array(jax.random.normal(latent_rng, (B, E), jnp.float32))
  noises = [torch.from_numpy(np.array(samplers.step_noise(noise_rng, i, (B, E), jnp.float32)))
            for i in range(steps)]
  scheduler = diffusers.UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                        clip_sample_range=clip)
  t = lambda x: torch.from_numpy(np.array(x))
  if guidance_scale > 1:
    emb = torch.cat([t(null.emb)[None].expand(B, -1), t(cond.emb)])
    enc = torch.cat([t(null.enc)[None].expand(B, -1, -1), t(cond.enc)])
    mask = torch.cat([t(null.mask)[None].expand(B, -1), t(cond.mask)])
  else:
    emb, enc, mask = t(cond.emb), t(cond.enc), t(cond.mask)
  want = diffusers_prior_stage(torch_prior, scheduler, torch.from_numpy(x_T), emb, enc, mask, guidance_scale,
                               steps, noises)
  err = np.abs(ours - want).max()
  print(f"prior sampling (g={guidance_scale}, {steps} steps, clip {clip}) max|Δ| vs diffusers = {err:.2e}, "
        f"scale {np.abs(want).max():.2f}")
  np.testing.assert_allclose(ours, want, atol=1e-4, rtol=1e-4)


def test_candidate_reranking(setup):
  """n candidates per prompt; the kept one has the highest cosine with the text embedding."""
  _, model, params, cond, null = setup
  diffusion = GaussianDiffusion(NoiseSchedule.create("cosine", 1000), prediction="x0", variance="fixed_small_log")
  best, allc, scores = prior_lib.sample(params, cond, jax.random.key(1), model=model, diffusion=diffusion,
                                        steps="5", num_candidates=3, null_cond=null, return_all=True)
  assert best.shape == (B, E) and allc.shape == (3, B, E) and scores.shape == (3, B)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  np.testing.assert_allclose(np.einsum("nbe,be->nb", unit(np.asarray(allc)), unit(np.asarray(cond.emb))),
                             np.asarray(scores), atol=1e-5)
  k = np.argmax(np.asarray(scores), axis=0)
  np.testing.assert_array_equal(np.asarray(best), np.asarray(allc)[k, np.arange(B)])


def test_sampling_bad_inputs(setup):
  _, model, params, cond, null = setup
  diffusion = GaussianDiffusion(NoiseSchedule.create("cosine", 1000), prediction="x0", variance="fixed_small_log")
  with pytest.raises(ValueError, match="text embedding must be"):
    prior_lib.sample(params, cond._replace(emb=cond.emb[:, :5]), jax.random.key(0), model=model,
                     diffusion=diffusion, steps="3")
  with pytest.raises(ValueError, match="text mask is required"):
    prior_lib.sample(params, cond._replace(mask=None), jax.random.key(0), model=model, diffusion=diffusion,
                     steps="3")
  with pytest.raises(ValueError, match="x_T must be"):
    prior_lib.sample(params, cond, jax.random.key(0), model=model, diffusion=diffusion, steps="3",
                     x_T=jnp.zeros((B, E)))


class _StopAfterPrior(Exception):
  pass


def test_prior_stage_of_real_unclip_pipeline(setup):
  """`UnCLIPPipeline.__call__` itself (components assembled in the test): its prior output, captured where
  it enters text_proj, equals our sampler fed the pipeline's own text encodings, latents and step noise."""
  from transformers import CLIPTextConfig, CLIPTextModelWithProjection

  torch_prior, model, params, _, _ = setup
  tokenizer = letters_tokenizer(L)
  torch.manual_seed(0)
  text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
      vocab_size=len(tokenizer), hidden_size=E, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=L, projection_dim=E, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2,
      pad_token_id=1)).eval()
  try:                                                   # UnCLIPTextProjModel moved in diffusers 0.38
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
  except ImportError:
    from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel
  text_proj = UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=E, time_embed_dim=64,
                            cross_attention_dim=24)
  captured = {}

  def grab(module, args, kwargs):
    captured.update({k: v.detach().clone() for k, v in kwargs.items() if torch.is_tensor(v)})
    raise _StopAfterPrior

  text_proj.register_forward_pre_hook(grab, with_kwargs=True)
  prior_scheduler = diffusers.UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                              clip_sample_range=5.0)
  pipe = diffusers.UnCLIPPipeline(prior=torch_prior, decoder=None, text_encoder=text_encoder, tokenizer=tokenizer,
                                  text_proj=text_proj, super_res_first=None, super_res_last=None,
                                  prior_scheduler=prior_scheduler, decoder_scheduler=None, super_res_scheduler=None)
  prompts = ["a lower cat", "low"]
  steps, g = 25, 4.0
  rng = jax.random.key(11)
  latent_rng, noise_rng = jax.random.split(rng)
  x_T = np.array(jax.random.normal(latent_rng, (B, E), jnp.float32))
  noises = [np.array(samplers.step_noise(noise_rng, i, (B, E), jnp.float32)) for i in range(steps)]
  calls = []

  def fake_randn(shape, generator=None, device=None, dtype=None, **kw):
    calls.append(shape)
    return torch.from_numpy(noises[len(calls) - 1]).to(dtype=dtype)

  original = scheduling_unclip.randn_tensor
  scheduling_unclip.randn_tensor = fake_randn
  try:
    with torch.no_grad(), pytest.raises(_StopAfterPrior):
      pipe(prompts, prior_num_inference_steps=steps, prior_guidance_scale=g, prior_latents=torch.from_numpy(x_T),
           decoder_guidance_scale=8.0)
  finally:
    scheduling_unclip.randn_tensor = original
  assert len(calls) == steps - 1
  want = captured["image_embeddings"].numpy()

  ids = tokenizer(prompts + [""] * B, padding="max_length", max_length=L, truncation=True, return_tensors="np")
  mask = ids["attention_mask"].astype(bool)
  emb, enc = captured["prompt_embeds"].numpy(), captured["text_encoder_hidden_states"].numpy()   # [uncond; cond]
  cond = prior_lib.TextCond(jnp.asarray(emb[B:]), jnp.asarray(enc[B:]), jnp.asarray(mask[:B]))
  null = prior_lib.TextCond(jnp.asarray(emb[:B]), jnp.asarray(enc[:B]), jnp.asarray(mask[B:]))
  diffusion = GaussianDiffusion(NoiseSchedule.create("cosine", 1000), prediction="x0", variance="fixed_small_log")
  settings = samplers.SamplerSettings(method="ddpm", guidance_scale=g, clip_range=5.0, single_step_beta="schedule")
  ours = np.asarray(jax.jit(lambda p, c, r, n: prior_lib.sample(
      p, c, r, model=model, diffusion=diffusion, steps=str(steps), settings=settings, num_candidates=1,
      null_cond=n))(params, cond, rng, null))
  err = np.abs(ours - want).max()
  print(f"prior stage of UnCLIPPipeline.__call__ (g={g}, {steps} steps) max|Δ| = {err:.2e}")
  np.testing.assert_allclose(ours, want, atol=1e-4, rtol=1e-4)


def test_make_sampler_from_tiny_config():
  """configs/prior.py:tiny end to end: init, set CLIP stats, jitted sampler with 2 candidates and guidance 4."""
  from unclip_jax import config_lib

  cfg = config_lib.load_config("configs/prior.py:tiny", ['sampling.steps="5"'])
  model = builders.prior(cfg.model, dtype="float32")
  params = builders.init_prior(model, jax.random.key(0))
  params = prior_lib.with_clip_stats(params, jnp.full((E,), 0.5), jnp.full((E,), 2.0))
  cond = prior_lib.TextCond(jnp.ones((B, E)), jnp.ones((B, L, E)), jnp.ones((B, L), bool))
  out = prior_lib.make_sampler(cfg, model)(params, cond, jax.random.key(0))
  assert out.shape == (B, E) and bool(jnp.all(jnp.isfinite(out)))
  # loss_fn runs on the same config and gives a finite scalar.
  batch = dict(image_emb=jnp.ones((B, E)), text_emb=cond.emb, text_enc=cond.enc, text_mask=cond.mask)
  from unclip_jax.diffusion.gaussian import GaussianDiffusion as GD
  loss, metrics = prior_lib.loss_fn(params, batch, jax.random.key(1), model=model,
                                    diffusion=GD.from_config(cfg.diffusion), text_drop_prob=cfg.text_drop_prob)
  assert np.isfinite(float(loss)) and set(metrics) == {"loss", "mse", "drop_frac"}
  with pytest.raises(ValueError, match="text_mask is required"):
    prior_lib.loss_fn(params, {k: v for k, v in batch.items() if k != "text_mask"}, jax.random.key(1), model=model,
                      diffusion=GD.from_config(cfg.diffusion))


def test_drop_text_uses_fixed_null():
  """Dropped rows get the (single-example) null conditioning, the others are untouched; rate ≈ prob."""
  rng = np.random.default_rng(0)
  n = 400
  cond = prior_lib.TextCond(jnp.asarray(rng.standard_normal((n, E)), jnp.float32),
                            jnp.asarray(rng.standard_normal((n, L, E)), jnp.float32), jnp.ones((n, L), bool))
  null = prior_lib.TextCond(jnp.full((E,), 7.0), jnp.full((L, E), 3.0), jnp.arange(L) < 2)
  out, dropped = prior_lib.drop_text(cond, null, jax.random.key(0), 0.1)
  d = np.asarray(dropped)
  assert 0.05 < d.mean() < 0.15
  np.testing.assert_array_equal(np.asarray(out.emb)[d], 7.0)
  np.testing.assert_array_equal(np.asarray(out.enc)[d], 3.0)
  np.testing.assert_array_equal(np.asarray(out.mask)[d], np.broadcast_to(np.arange(L) < 2, (d.sum(), L)))
  np.testing.assert_array_equal(np.asarray(out.emb)[~d], np.asarray(cond.emb)[~d])
  np.testing.assert_array_equal(np.asarray(out.mask)[~d], True)
