"""Decoder sampling vs the decoder stage of diffusers' UnCLIPPipeline (same latents, same step noise), the null
text of the CFG branch, the full real pipeline end to end, make_sampler from the tiny config, and bad inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
import diffusers.schedulers.scheduling_unclip as scheduling_unclip  # noqa: E402

from unclip_jax import config_lib  # noqa: E402
from unclip_jax.stages import decoder as decoder_lib, prior as prior_lib  # noqa: E402
from unclip_jax.convert import unet as convert_unet  # noqa: E402
from unclip_jax.diffusion import samplers  # noqa: E402
from unclip_jax.diffusion.gaussian import GaussianDiffusion  # noqa: E402
from unclip_jax.diffusion.schedules import NoiseSchedule  # noqa: E402
from unclip_jax.models import text_proj as tp_lib  # noqa: E402
from unclip_jax.models import unet as unet_lib  # noqa: E402
from unclip_jax.stages import builders, common  # noqa: E402

import helpers  # noqa: E402
from helpers import (TP_KW, convert_decoder, decoder_diffusion, fake_randn_from, make_torch_decoder,  # noqa: E402,F401
                     nchw, nhwc)

UnCLIPTextProjModel = helpers.unclip_text_proj_class()

B, L, E, S = 2, 16, 32, 16          # batch, text length, CLIP width, image size
TOL = 1e-3


def diffusers_decoder_stage(text_proj, decoder, scheduler, image_emb, prompt_embeds, text_enc, text_mask, latents,
                            guidance_scale, steps):
  """The decoder section of `UnCLIPPipeline.__call__` (diffusers 0.42.1), line for line.

  Conditioning arrives as `_encode_prompt` returns it: [uncond; cond] when guiding."""
  cfg = guidance_scale > 1.0
  with torch.no_grad():
    text_enc_hid_states, additive_clip_time_embeddings = text_proj(
        image_embeddings=image_emb, prompt_embeds=prompt_embeds, text_encoder_hidden_states=text_enc,
        do_classifier_free_guidance=cfg)
    decoder_text_mask = torch.nn.functional.pad(text_mask, (text_proj.clip_extra_context_tokens, 0), value=True)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
      latent_model_input = torch.cat([latents] * 2) if cfg else latents
      noise_pred = decoder(sample=latent_model_input, timestep=t, encoder_hidden_states=text_enc_hid_states,
                           class_labels=additive_clip_time_embeddings, attention_mask=decoder_text_mask).sample
      if cfg:
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred_uncond, _ = noise_pred_uncond.split(latent_model_input.shape[1], dim=1)
        noise_pred_text, predicted_variance = noise_pred_text.split(latent_model_input.shape[1], dim=1)
        noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        noise_pred = torch.cat([noise_pred, predicted_variance], dim=1)
      prev_timestep = None if i + 1 == timesteps.shape[0] else timesteps[i + 1]
      latents = scheduler.step(noise_pred, t, latents, prev_timestep=prev_timestep).prev_sample
    return latents.clamp(-1, 1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  torch_unet, torch_tp = make_torch_decoder()
  unet, text_proj, params = convert_decoder(torch_unet, torch_tp, tmp_path_factory.mktemp("decoder_sampling"))
  rng = np.random.default_rng(0)
  mask = np.arange(L)[None, :] < np.array([[5], [L]])                  # one padded prompt, one full
  cond = decoder_lib.DecoderCond(*(jnp.asarray(a, jnp.float32) for a in (
      rng.standard_normal((B, E)), rng.standard_normal((B, E)), rng.standard_normal((B, L, E)))),
      jnp.asarray(mask))
  null = prior_lib.TextCond(jnp.asarray(rng.standard_normal((E,)), jnp.float32),       # stands in for CLIP("")
                            jnp.asarray(rng.standard_normal((L, E)), jnp.float32), jnp.asarray(np.arange(L) < 2))
  samplers_by_key = {}

  def ours(steps, guidance):
    key = (steps, guidance)
    if key not in samplers_by_key:                     # one compiled program per (steps, guidance)
      settings = samplers.SamplerSettings(method="ddpm", guidance_scale=guidance, clip_range=1.0,
                                          single_step_beta="schedule")
      samplers_by_key[key] = jax.jit(lambda p, c, x, r, n: decoder_lib.sample(
          p, c, x, r, unet=unet, text_proj=text_proj, diffusion=decoder_diffusion(), steps=str(steps),
          settings=settings, null_text=n))
    return samplers_by_key[key]

  return dict(torch_unet=torch_unet, torch_tp=torch_tp, unet=unet, text_proj=text_proj, params=params, cond=cond,
              null=null, ours=ours, x_T=jax.random.normal(jax.random.key(1), (B, S, S, 3), jnp.float32),
              rng=jax.random.key(2))


def _t(x):
  return torch.from_numpy(np.array(x))


def _noise(rng, steps, shape):
  """Our per-step noise (NHWC) for every step and its NCHW copy for diffusers' scheduler."""
  return [nchw(samplers.step_noise(rng, i, shape, jnp.float32)) for i in range(steps)]


@pytest.mark.parametrize("guidance_scale,steps,null_kind", [(8.0, 25, "empty_prompt"), (1.0, 7, None),
                                                            (8.0, 25, "zeros")])
def test_decoder_sampling_matches_diffusers_pipeline(setup, monkeypatch, guidance_scale, steps, null_kind):
  """Karlo settings (g=8, 25 steps) with the "" encoding as uncond text, unguided (7 steps), and g=8 with the
  training null (zero text, all-False mask; passed explicitly so it reuses the compiled 25-step program)."""
  s = setup
  cond, x_T, rng = s["cond"], s["x_T"], s["rng"]
  zeros = prior_lib.TextCond(*(x[0] for x in common.zeros_null_text(1, L, E)))         # shaped like s["null"]
  null = {"empty_prompt": s["null"], "zeros": zeros, None: None}[null_kind]
  got = np.asarray(s["ours"](steps, guidance_scale)(s["params"], cond, x_T, rng, null))

  calls = []
  monkeypatch.setattr(scheduling_unclip, "randn_tensor", fake_randn_from(_noise(rng, steps, x_T.shape), calls))
  if guidance_scale > 1:
    rows = lambda x, like: _t(jnp.broadcast_to(x, like.shape))                      # [uncond; cond]
    emb, enc, mask = (torch.cat([rows(n, c), _t(c)]) for n, c in zip(null, cond[1:]))
  else:
    emb, enc, mask = _t(cond.text_emb), _t(cond.text_enc), _t(cond.text_mask)
  scheduler = diffusers.UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon")
  want = nhwc(diffusers_decoder_stage(s["torch_tp"], s["torch_unet"], scheduler, _t(cond.image_emb), emb, enc, mask,
                                      nchw(x_T), guidance_scale, steps))
  assert len(calls) == steps - 1
  err = np.abs(got - want).max()
  print(f"decoder sampling (g={guidance_scale}, {steps} steps, null {null_kind}) max|Δ| vs diffusers = {err:.2e}; "
        f"{np.mean(np.abs(want) > 0.999):.0%} of pixels at the ±1 clamp")
  assert got.shape == (B, S, S, 3) and np.abs(got).max() <= 1.0
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_cfg_branch_with_empty_prompt_matches_diffusers(setup):
  """decoder_cond with null_text = CLIP("") equals diffusers' text_proj + left-padded mask on [uncond; cond]."""
  s = setup
  cond, null = s["cond"], s["null"]
  got = decoder_lib.decoder_cond(s["text_proj"], s["params"]["text_proj"], image_emb=cond.image_emb,
                                 text_emb=cond.text_emb, text_enc=cond.text_enc, text_mask=cond.text_mask,
                                 guidance=True, null_text=null)
  with torch.no_grad():
    ehs, cl = s["torch_tp"](image_embeddings=_t(cond.image_emb),
                            prompt_embeds=torch.cat([_t(null.emb)[None].expand(B, -1), _t(cond.text_emb)]),
                            text_encoder_hidden_states=torch.cat([_t(null.enc)[None].expand(B, -1, -1),
                                                                  _t(cond.text_enc)]),
                            do_classifier_free_guidance=True)
  mask = torch.nn.functional.pad(torch.cat([_t(null.mask)[None].expand(B, -1), _t(cond.text_mask)]), (4, 0),
                                 value=True)
  np.testing.assert_allclose(np.asarray(got["encoder_hidden_states"]), ehs.numpy(), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got["class_labels"]), cl.numpy(), atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(got["attention_mask"]), mask.numpy())
  # A batched null ([B, ...]) gives the same result as the single-example one.
  batched = prior_lib.TextCond(*(jnp.broadcast_to(x, (B,) + x.shape) for x in null))
  again = decoder_lib.decoder_cond(s["text_proj"], s["params"]["text_proj"], **dict(zip(
      ("image_emb", "text_emb", "text_enc", "text_mask"), cond)), guidance=True, null_text=batched)
  for k in got:
    np.testing.assert_array_equal(np.asarray(again[k]), np.asarray(got[k]))


def test_default_null_is_the_training_drop(setup):
  """Uncond half of decoder_cond (default null) == what decoder training feeds an example whose image embedding
  AND text were both dropped (learned CFG embedding, zero text, all-False text mask); cond half == no drop."""
  s = setup
  cond, tp, p = s["cond"], s["text_proj"], {"params": s["params"]["text_proj"]}
  got = decoder_lib.decoder_cond(tp, p["params"], image_emb=cond.image_emb, text_emb=cond.text_emb,
                                 text_enc=cond.text_enc, text_mask=cond.text_mask, guidance=True)
  zeros = lambda x: jnp.zeros_like(x)
  dropped = tp.apply(p, image_embeddings=cond.image_emb, prompt_embeds=zeros(cond.text_emb),
                     text_encoder_hidden_states=zeros(cond.text_enc), text_mask=zeros(cond.text_mask).astype(bool),
                     do_classifier_free_guidance=False, drop_image=jnp.ones((B,), bool),
                     method=tp_lib.UnCLIPTextProj.conditioning)
  kept = tp.apply(p, image_embeddings=cond.image_emb, prompt_embeds=cond.text_emb,
                  text_encoder_hidden_states=cond.text_enc, text_mask=cond.text_mask,
                  do_classifier_free_guidance=False, method=tp_lib.UnCLIPTextProj.conditioning)
  for k in got:
    np.testing.assert_allclose(np.asarray(got[k][:B]), np.asarray(dropped[k]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(got[k][B:]), np.asarray(kept[k]), atol=1e-6)
  assert not np.asarray(got["attention_mask"][:B, 4:]).any() and np.asarray(got["attention_mask"][:, :4]).all()


def test_make_sampler_from_tiny_config(setup):
  """configs/decoder.py:tiny builds the diffusers twin; its jitted make_sampler (25 steps, g=8, clamp ±1
  from cfg.sampling) reproduces the diffusers-matched 25-step result; null_text='empty_prompt' needs null_text."""
  s = setup
  cfg = config_lib.load_config("configs/decoder.py:tiny", ['sampling.single_step_beta="schedule"'])
  assert (cfg.sampling.steps, cfg.sampling.guidance_scale, cfg.sampling.clip_range) == ("25", 8.0, 1.0)
  unet = builders.unet(cfg.model, dtype="float32")
  tp = builders.text_proj(cfg.model, dtype="float32")
  shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
  assert shapes(builders.abstract(builders.init_unet, unet)) == shapes(s["params"]["unet"])
  assert shapes(builders.abstract(builders.init_text_proj, tp)) == shapes(s["params"]["text_proj"])
  run = decoder_lib.make_sampler(cfg, unet, tp)
  args = jax.device_put((s["params"], s["cond"], s["x_T"], s["rng"], s["null"]))
  with jax.transfer_guard("disallow"):                  # no implicit host transfers
    out = run(*args)
  out = np.asarray(out)
  want = s["ours"](25, 8.0)(s["params"], s["cond"], s["x_T"], s["rng"], s["null"])   # compiled once per module
  np.testing.assert_allclose(out, np.asarray(want), atol=1e-5)
  cfg.unlock()
  cfg.null_text = "empty_prompt"
  with pytest.raises(ValueError, match="needs null_text"):
    decoder_lib.make_sampler(cfg, unet, tp)(s["params"], s["cond"], s["x_T"], s["rng"])
  cfg.null_text = "learned"
  with pytest.raises(ValueError, match="unknown null_text 'learned'"):
    decoder_lib.make_sampler(cfg, unet, tp)


def test_bad_inputs(setup):
  s = setup
  cond, diffusion = s["cond"], decoder_diffusion()
  x_T = jnp.zeros((B, S, S, 3))
  kw = dict(unet=s["unet"], text_proj=s["text_proj"], diffusion=diffusion, steps="2")
  run = lambda c=cond, x=x_T, **extra: decoder_lib.sample(s["params"], c, x, jax.random.key(0), **{**kw, **extra})
  with pytest.raises(ValueError, match=r"image_emb must be \[B, 32\]"):
    run(cond._replace(image_emb=cond.image_emb[:, :5]))
  with pytest.raises(ValueError, match=r"text_enc must be \[2, L, 32\]"):
    run(cond._replace(text_enc=cond.text_enc[:1]))
  with pytest.raises(ValueError, match=r"text_mask must be \[2, 16\]"):
    run(cond._replace(text_mask=cond.text_mask[:, :3]))
  with pytest.raises(ValueError, match="text_mask is required"):
    run(cond._replace(text_mask=None))
  with pytest.raises(ValueError, match=r"null text token states must be \[16, 32\] or \[2, 16, 32\]"):
    run(null_text=s["null"]._replace(enc=jnp.zeros((L + 1, E))))
  with pytest.raises(ValueError, match=r"x_T must be \[B, H, W, 3\]"):
    run(x=jnp.zeros((B, 3, S, S)))
  with pytest.raises(ValueError, match="conditioning has 2 rows but x_T has batch 1"):
    run(x=jnp.zeros((1, S, S, 3)))
  with pytest.raises(ValueError, match=r"inpaint_mask must be \[B, H, W, 1\] = \[2, 16, 16, 1\] or \[B, H, W\]"):
    run(inpaint_image=jnp.zeros((B, S, S, 3)), inpaint_mask=jnp.zeros((B, 8, 8, 1)))
  with pytest.raises(ValueError, match="pass both inpaint_image and inpaint_mask"):
    run(inpaint_image=jnp.zeros((B, S, S, 3)))
  with pytest.raises(ValueError, match="'glide' needs a UNet with the inpaint channels"):
    run(inpaint_image=jnp.zeros((B, S, S, 3)), inpaint_mask=jnp.zeros((B, S, S)), inpaint_method="glide")
  with pytest.raises(ValueError, match="unknown inpaint_method 'paste'"):
    run(inpaint_method="paste")
  with pytest.raises(ValueError, match="prebuilt UNet kwargs must have 4 rows"):
    run(c={"encoder_hidden_states": jnp.zeros((B, 20, 24)), "class_labels": jnp.zeros((B, 64))})
  with pytest.raises(ValueError, match="unknown UNet arguments"):
    decoder_lib.model_fn_for(s["unet"], s["params"]["unet"], {"ehs": jnp.zeros((B, 20, 24))})
  with pytest.raises(ValueError, match="out_channels=6 but variance 'fixed_small_log' needs 3"):
    run(diffusion=GaussianDiffusion(NoiseSchedule.create("cosine", 1000), variance="fixed_small_log"))


def test_text_guidance_equal_scales_is_plain_guidance(setup):
  """sampling.text_guidance_scale = guidance_scale reproduces plain guidance (three branches, same images); another
  text scale changes them. The image rows carry the CLIP embedding with the null text."""
  cfg = config_lib.load_config("decoder:tiny")
  cfg.sampling.steps, cfg.sampling.guidance_scale = "3", 3.0
  models = decoder_lib.build(cfg)
  params = decoder_lib.init_params(models, jax.random.key(0))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  e, l = cfg.model.clip_embedding_dim, 5
  k = jax.random.split(jax.random.key(2), 3)
  cond = decoder_lib.DecoderCond(jax.random.normal(k[0], (B, e)), jax.random.normal(k[1], (B, e)),
                                 jax.random.normal(k[2], (B, l, e)), jnp.ones((B, l), bool))
  x_T = jax.random.normal(jax.random.key(3), (B, 16, 16, 3))
  images = {}
  for text_scale in (None, 3.0, 6.0):
    c = config_lib.load_config("decoder:tiny")
    c.sampling.steps, c.sampling.guidance_scale, c.sampling.text_guidance_scale = "3", 3.0, text_scale
    images[text_scale] = decoder_lib.make_sampler(c, models.unet, models.text_proj, models.diffusion)(
        params, cond, x_T, jax.random.key(4))
  # guide() makes s_text = s plain guidance's arithmetic exactly (test_samplers), but the rows of the tripled batch
  # [u; i; c] sit at other batch positions than in [u; c], and XLA:CPU may round those differently (seen on one CI
  # machine: 4.8e-4 after 3 steps of this deliberately noisy UNet). So "the same images" is measured against what
  # changing the text scale does (guide's formula itself: test_samplers.test_text_guidance_three_branches).
  same = float(jnp.abs(images[3.0] - images[None]).max())
  moved = float(jnp.abs(images[6.0] - images[None]).mean())
  assert moved > 0.05, moved
  assert same < 0.005 * moved, (same, moved)
  rows = decoder_lib.decoder_cond(models.text_proj, params["text_proj"], image_emb=cond.image_emb,
                                  text_emb=cond.text_emb, text_enc=cond.text_enc, text_mask=cond.text_mask, guidance=3)
  two = decoder_lib.decoder_cond(models.text_proj, params["text_proj"], image_emb=cond.image_emb,
                                 text_emb=cond.text_emb, text_enc=cond.text_enc, text_mask=cond.text_mask, guidance=True)
  assert rows["class_labels"].shape[0] == 3 * B
  np.testing.assert_allclose(rows["class_labels"][:B], two["class_labels"][:B], atol=1e-6)      # uncond
  np.testing.assert_allclose(rows["class_labels"][2 * B:], two["class_labels"][B:], atol=1e-6)  # cond
  assert not rows["attention_mask"][B:2 * B, 4:].any()                                           # image: null text
  with pytest.raises(ValueError, match="branches"):
    decoder_lib.decoder_cond(models.text_proj, params["text_proj"], image_emb=cond.image_emb, text_emb=cond.text_emb,
                             text_enc=cond.text_enc, text_mask=cond.text_mask, guidance=4)
