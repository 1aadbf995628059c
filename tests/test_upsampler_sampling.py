"""Super-res sampling vs the super-res stage of diffusers' UnCLIPPipeline (two tiny random UNet2DModels, bicubic
antialias upsampling, 7 steps, same latents and step noise), the first/last model split, make_sampler, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
import diffusers.schedulers.scheduling_unclip as scheduling_unclip  # noqa: E402

from unclip_jax.stages import upsampler as upsampler_lib  # noqa: E402
from unclip_jax.convert import unet as convert_unet  # noqa: E402
from unclip_jax.diffusion import samplers  # noqa: E402
from unclip_jax.diffusion.gaussian import GaussianDiffusion  # noqa: E402
from unclip_jax.diffusion.schedules import NoiseSchedule, step_table  # noqa: E402
from unclip_jax.models import unet as unet_lib  # noqa: E402
from unclip_jax.stages import builders, common  # noqa: E402

import helpers  # noqa: E402
from helpers import fake_randn_from, nchw, nhwc  # noqa: E402

B, LOW, HIGH, STEPS = 2, 16, 32, 7
TOL = 1e-3


def diffusers_super_res_stage(super_res_first, super_res_last, scheduler, image_small, latents, steps):
  """The super-res section of `UnCLIPPipeline.__call__` (diffusers 0.42.1), line for line (CPU branch)."""
  with torch.no_grad():
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    height = width = super_res_first.config.sample_size
    image_upscaled = torch.nn.functional.interpolate(image_small, size=[height, width], mode="bicubic",
                                                     align_corners=False, antialias=True)
    for i, t in enumerate(timesteps):
      unet = super_res_last if i == timesteps.shape[0] - 1 else super_res_first
      latent_model_input = torch.cat([latents, image_upscaled], dim=1)
      noise_pred = unet(sample=latent_model_input, timestep=t).sample
      prev_timestep = None if i + 1 == timesteps.shape[0] else timesteps[i + 1]
      latents = scheduler.step(noise_pred, t, latents, prev_timestep=prev_timestep).prev_sample
  return latents


def make_torch_super_res():
  """super_res_first / super_res_last: the same tiny UNet2DModel with different random weights."""
  torch.manual_seed(0)
  first = helpers.randomize(diffusers.UNet2DModel(**helpers.SR_KW), 2)
  last = helpers.randomize(diffusers.UNet2DModel(**{**helpers.SR_KW, "sample_size": None}), 3)
  return first, last


def convert_super_res(first, last, tmp):
  first.save_pretrained(tmp / "super_res_first")
  last.save_pretrained(tmp / "super_res_last")
  cfg, p_first = convert_unet.load_diffusers_unet(tmp / "super_res_first")
  cfg_last, p_last = convert_unet.load_diffusers_unet(tmp / "super_res_last")
  assert cfg.conditioning == cfg_last.conditioning == "low_res"
  return builders.unet(cfg, dtype="float32"), p_first, p_last


def sr_diffusion():
  return GaussianDiffusion(NoiseSchedule.create("cosine", 1000), prediction="eps", variance="fixed_small_log")


SR_SETTINGS = samplers.SamplerSettings(method="ddpm", guidance_scale=1.0, clip_range=1.0, single_step_beta="schedule")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  torch_first, torch_last = make_torch_super_res()
  unet, p_first, p_last = convert_super_res(torch_first, torch_last, tmp_path_factory.mktemp("sr_sampling"))
  low_res = jnp.tanh(1.5 * jax.random.normal(jax.random.key(0), (B, LOW, LOW, 3)))
  run = jax.jit(lambda pf, pl, lr, x, r: upsampler_lib.sample(pf, pl, lr, x, r, unet=unet, diffusion=sr_diffusion(),
                                                                steps=str(STEPS), settings=SR_SETTINGS))
  return dict(torch_first=torch_first, torch_last=torch_last, unet=unet, first=p_first, last=p_last,
              low_res=low_res, run=run)


def test_super_res_matches_diffusers_pipeline(setup, monkeypatch):
  s = setup
  x_T = jax.random.normal(jax.random.key(1), (B, HIGH, HIGH, 3))
  rng = jax.random.key(2)
  got = np.asarray(s["run"](s["first"], s["last"], s["low_res"], x_T, rng))
  calls = []
  noises = [nchw(samplers.step_noise(rng, i, x_T.shape, jnp.float32)) for i in range(STEPS)]
  monkeypatch.setattr(scheduling_unclip, "randn_tensor", fake_randn_from(noises, calls))
  scheduler = diffusers.UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon")
  want = nhwc(diffusers_super_res_stage(s["torch_first"], s["torch_last"], scheduler, nchw(s["low_res"]), nchw(x_T),
                                        STEPS))
  assert len(calls) == STEPS - 1
  want = np.clip(want, -1.0, 1.0)                         # the pipeline's final clamp, (x·0.5+0.5).clamp(0, 1)
  err = np.abs(got - want).max()
  print(f"super-res sampling ({STEPS} steps, first/last models) max|Δ| vs diffusers = {err:.2e}")
  assert got.shape == (B, HIGH, HIGH, 3)
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_last_model_runs_only_the_final_step(setup):
  """sample(first, last) == a Python loop of single sampler steps using `first` for steps 0..N-2 and `last` for
  step N-1; swapping in `last` anywhere else (or dropping it) changes the result."""
  s = setup
  unet, diffusion = s["unet"], sr_diffusion()
  x_T = jax.random.normal(jax.random.key(3), (B, HIGH, HIGH, 3))
  rng = jax.random.key(4)
  upsampled = common.upsample_low_res(s["low_res"], HIGH, "bicubic")
  table = step_table(diffusion.schedule, str(STEPS), SR_SETTINGS.single_step_beta).as_scan_inputs()

  @jax.jit
  def one_step(params, x, step):
    model_fn = upsampler_lib.model_fn_for(unet, params, upsampled)
    return samplers.sampler_step(model_fn, x, step, rng, diffusion=diffusion, settings=SR_SETTINGS)[0]

  def loop(which):
    x = x_T
    for i in range(STEPS):
      x = one_step(s[which(i)], x, {k: jnp.asarray(v[i]) for k, v in table.items()})
    return np.clip(np.asarray(x), -1, 1)

  got = np.asarray(s["run"](s["first"], s["last"], s["low_res"], x_T, rng))
  np.testing.assert_allclose(got, loop(lambda i: "last" if i == STEPS - 1 else "first"), atol=1e-5)
  assert np.abs(got - loop(lambda i: "last" if i == STEPS - 2 else "first")).max() > 1e-2
  single = np.asarray(s["run"](s["first"], None, s["low_res"], x_T, rng))
  np.testing.assert_allclose(single, loop(lambda i: "first"), atol=1e-5)
  assert np.abs(got - single).max() > 1e-3          # small: ε is scaled by √(1-ᾱ_0) ≈ 6e-3 at t = 0


def test_make_sampler_from_tiny_config(setup):
  """configs/upsampler.py:tiny builds the diffusers twin; its jitted make_sampler (7 steps, bicubic, first/last
  split from cfg) reproduces the diffusers-matched result; last_step_model is enforced."""
  from unclip_jax import config_lib

  s = setup
  cfg = config_lib.load_config("configs/upsampler.py:tiny", ['sampling.single_step_beta="schedule"'])
  assert (cfg.sampling.steps, cfg.model.resize_method, cfg.last_step_model) == (str(STEPS), "bicubic", True)
  unet = builders.unet(cfg.model, dtype="float32")
  assert jax.tree.map(lambda x: x.shape, builders.abstract(builders.init_unet, unet)) == \
      jax.tree.map(lambda x: x.shape, s["first"])
  run = upsampler_lib.make_sampler(cfg, unet)
  x_T = jax.random.normal(jax.random.key(5), (B, HIGH, HIGH, 3))
  args = jax.device_put((s["first"], s["last"], s["low_res"], x_T, jax.random.key(6)))
  with jax.transfer_guard("disallow"):                  # no implicit host transfers
    out = run(*args)
  np.testing.assert_allclose(np.asarray(out), np.asarray(s["run"](*args)), atol=1e-5)
  with pytest.raises(ValueError, match="pass params_last"):
    run(s["first"], None, s["low_res"], x_T, jax.random.key(6))
  cfg.last_step_model = False
  with pytest.raises(ValueError, match="params_last must be None"):
    upsampler_lib.make_sampler(cfg, unet)(s["first"], s["last"], s["low_res"], x_T, jax.random.key(6))


def test_bad_inputs(setup):
  s = setup
  x_T = jnp.zeros((B, HIGH, HIGH, 3))
  run = lambda low_res=s["low_res"], x=x_T, **kw: upsampler_lib.sample(
      s["first"], None, low_res, x, jax.random.key(0), unet=s["unet"], **{"diffusion": sr_diffusion(), **kw})
  with pytest.raises(ValueError, match="run unguided: guidance_scale must be 1"):
    run(settings=samplers.SamplerSettings(guidance_scale=4.0))
  with pytest.raises(ValueError, match=r"low_res must be \[2, h, w, 3\]"):
    run(low_res=s["low_res"][:1])
  with pytest.raises(ValueError, match=r"x_T must be \[B, H, W, 3\]"):
    run(x=jnp.zeros((B, 3, HIGH, HIGH)))
  with pytest.raises(ValueError, match="need a UNet with conditioning='inpaint_low_res'"):
    run(inpaint_image=x_T, inpaint_mask=jnp.ones((B, HIGH, HIGH)))
  with pytest.raises(ValueError, match="out_channels=3 but variance 'learned_range' needs 6"):
    run(diffusion=GaussianDiffusion(NoiseSchedule.create("cosine", 1000), variance="learned_range"))
  with pytest.raises(ValueError, match="super-res UNet has in_channels=3"):
    upsampler_lib.conditioning_of(unet_lib.UNet(in_channels=3, out_channels=3))


def test_real_unclip_pipeline_end_to_end(setup, tmp_path, monkeypatch):
  """`UnCLIPPipeline.__call__` itself (tiny components assembled in the test; prior g=4, decoder g=8, 25 + 25
  + 7 steps) equals our prior -> decoder -> super-res chain fed the pipeline's text encodings, the same latents
  and the same per-step noise: the decoder output (seen where it enters super_res_first) and the final images."""
  from transformers import CLIPTextConfig, CLIPTextModelWithProjection

  from helpers import (PRIOR_KW as TINY_KW, convert_decoder, decoder_diffusion, letters_tokenizer, make_torch_decoder,
                       make_torch_prior)
  from unclip_jax.stages import decoder as decoder_lib, prior as prior_lib
  from unclip_jax.convert import prior as convert_prior
  from unclip_jax.models import prior as prior_model

  s = setup
  e, l = TINY_KW["embedding_dim"], TINY_KW["num_embeddings"]
  torch_prior = make_torch_prior(3)
  torch_prior.save_pretrained(tmp_path / "prior")
  prior_cfg, prior_params = convert_prior.load_diffusers(tmp_path / "prior")
  prior = builders.prior(prior_cfg)
  torch_decoder, torch_tp = make_torch_decoder()
  unet, text_proj, dec_params = convert_decoder(torch_decoder, torch_tp, tmp_path)
  tokenizer = letters_tokenizer(TINY_KW["num_embeddings"])
  torch.manual_seed(0)
  text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
      vocab_size=len(tokenizer), hidden_size=e, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=l, projection_dim=e, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2,
      pad_token_id=1)).eval()
  captured = {}
  torch_tp.register_forward_pre_hook(
      lambda m, a, kw: captured.update({k: v.detach().clone() for k, v in kw.items() if torch.is_tensor(v)}),
      with_kwargs=True)

  def grab_sr_input(module, args, kwargs):
    captured.setdefault("sr_input", kwargs["sample"].detach().clone())

  hook = s["torch_first"].register_forward_pre_hook(grab_sr_input, with_kwargs=True)   # the module-scoped model
  pipe = diffusers.UnCLIPPipeline(
      prior=torch_prior, decoder=torch_decoder, text_encoder=text_encoder, tokenizer=tokenizer, text_proj=torch_tp,
      super_res_first=s["torch_first"], super_res_last=s["torch_last"],
      prior_scheduler=diffusers.UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                                clip_sample_range=5.0),
      decoder_scheduler=diffusers.UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
      super_res_scheduler=diffusers.UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"))
  pipe.set_progress_bar_config(disable=True)

  prompts, g_prior, g_dec, n_prior, n_dec = ["a lower cat", "low"], 4.0, 8.0, 25, 25
  keys = jax.random.split(jax.random.key(21), 5)
  prior_rng, dec_rng, sr_rng = keys[0], keys[1], keys[2]
  prior_latent_rng, prior_noise_rng = jax.random.split(prior_rng)
  prior_x_T = jax.random.normal(prior_latent_rng, (B, e), jnp.float32)
  dec_x_T = jax.random.normal(keys[3], (B, LOW, LOW, 3), jnp.float32)
  sr_x_T = jax.random.normal(keys[4], (B, HIGH, HIGH, 3), jnp.float32)
  noises = ([torch.from_numpy(np.array(samplers.step_noise(prior_noise_rng, i, (B, e), jnp.float32)))
             for i in range(n_prior - 1)]
            + [nchw(samplers.step_noise(dec_rng, i, dec_x_T.shape, jnp.float32)) for i in range(n_dec - 1)]
            + [nchw(samplers.step_noise(sr_rng, i, sr_x_T.shape, jnp.float32)) for i in range(STEPS - 1)])
  calls = []
  monkeypatch.setattr(scheduling_unclip, "randn_tensor", fake_randn_from(noises, calls))
  with torch.no_grad():
    try:
      want = pipe(prompts, prior_num_inference_steps=n_prior, decoder_num_inference_steps=n_dec,
                  super_res_num_inference_steps=STEPS, prior_latents=torch.from_numpy(np.array(prior_x_T)),
                  decoder_latents=nchw(dec_x_T), super_res_latents=nchw(sr_x_T), prior_guidance_scale=g_prior,
                  decoder_guidance_scale=g_dec, output_type="np").images
    finally:
      hook.remove()
  assert len(calls) == len(noises)

  ids = tokenizer(prompts + [""] * B, padding="max_length", max_length=l, truncation=True, return_tensors="np")
  mask = jnp.asarray(ids["attention_mask"].astype(bool))
  emb, enc = (jnp.asarray(captured[k].numpy()) for k in ("prompt_embeds", "text_encoder_hidden_states"))
  text = prior_lib.TextCond(emb[B:], enc[B:], mask[:B])                      # _encode_prompt: [uncond; cond]
  null = prior_lib.TextCond(emb[:B], enc[:B], mask[B:])
  prior_diffusion = GaussianDiffusion(NoiseSchedule.create("cosine", 1000), prediction="x0",
                                      variance="fixed_small_log")

  @jax.jit
  def chain(prior_params, dec_params, first, last):
    image_emb = prior_lib.sample(prior_params, text, prior_rng, model=prior, diffusion=prior_diffusion,
                                 steps=str(n_prior), num_candidates=1, null_cond=null,
                                 settings=samplers.SamplerSettings(guidance_scale=g_prior, clip_range=5.0,
                                                                   single_step_beta="schedule"))
    small = decoder_lib.sample(dec_params, decoder_lib.DecoderCond(image_emb, text.emb, text.enc, text.mask),
                               dec_x_T, dec_rng, unet=unet, text_proj=text_proj, diffusion=decoder_diffusion(),
                               steps=str(n_dec), null_text=null,
                               settings=samplers.SamplerSettings(guidance_scale=g_dec, clip_range=1.0,
                                                                 single_step_beta="schedule"))
    big = upsampler_lib.sample(first, last, small, sr_x_T, sr_rng, unet=s["unet"], diffusion=sr_diffusion(),
                               steps=str(STEPS), settings=SR_SETTINGS)
    return image_emb, common.upsample_low_res(small, HIGH), big

  image_emb, upscaled, big = chain(prior_params, dec_params, s["first"], s["last"])
  errs = dict(prior=np.abs(np.asarray(image_emb) - captured["image_embeddings"].numpy()).max(),
              decoder=np.abs(np.asarray(upscaled) - nhwc(captured["sr_input"][:, 3:])).max(),
              images=np.abs(np.clip(np.asarray(big) * 0.5 + 0.5, 0, 1) - want).max())
  print("real UnCLIPPipeline end to end, max|Δ|: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
  assert want.shape == (B, HIGH, HIGH, 3)
  assert errs["prior"] < 1e-4 and errs["decoder"] < TOL and errs["images"] < TOL, errs
