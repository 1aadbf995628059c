"""End to end: a tiny random diffusers UnCLIPPipeline, converted with our CLI, run with the same noise as ours.

The pipeline is `diffusers.UnCLIPPipeline.__call__` itself (components assembled in the test),
with the shipped CLIP BPE as its tokenizer (pad "!", like Karlo). Its latents are passed in; its step noise, which
`UnCLIPScheduler.step` draws with `randn_tensor`, is replaced by the arrays our samplers draw from their keys.
"""
import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_unclip  # noqa: E402

from unclip_jax.convert import cli as convert  # noqa: E402
from unclip_jax.data import tokenizer as tok_lib  # noqa: E402
from unclip_jax.diffusion import samplers  # noqa: E402
from unclip_jax.inference.pipeline import StageNoise, UnCLIP  # noqa: E402

E, L, B = 32, 16, 2
PROMPTS = ["a red circle on a white background", "green square"]


def _text_proj_cls():
  try:                                                   # UnCLIPTextProjModel moved in diffusers 0.38
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
  except ImportError:
    from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel
  return UnCLIPTextProjModel


def _randomize(module, seed, scale=0.2):
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name == "clip_std":
        p.copy_(1.0 + 0.3 * torch.rand_like(p))           # a standard deviation: positive
      else:
        p.normal_(0.0, scale)
  return module.eval()


def _tiny_pipeline():
  import transformers

  vocab, merges = tok_lib.load_vocab_and_merges()
  tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=L)
  text_encoder = _randomize(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      vocab_size=49408, hidden_size=E, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=L, projection_dim=E, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2,
      pad_token_id=1)), 0)
  prior = _randomize(diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=12, num_layers=2,
                                                embedding_dim=E, num_embeddings=L, additional_embeddings=4), 1)
  text_proj = _randomize(_text_proj_cls()(clip_extra_context_tokens=4, clip_embeddings_dim=E, time_embed_dim=64,
                                          cross_attention_dim=24), 2)
  decoder = _randomize(diffusers.UNet2DConditionModel(
      sample_size=16, in_channels=3, out_channels=6,
      down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
      up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
      mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(16, 32, 48), layers_per_block=2,
      norm_num_groups=8, cross_attention_dim=24, attention_head_dim=8, resnet_time_scale_shift="scale_shift",
      class_embed_type="identity"), 3, scale=0.05)
  sr = dict(sample_size=32, in_channels=6, out_channels=3, layers_per_block=2, norm_num_groups=8,
            block_out_channels=(16, 32, 48), down_block_types=("ResnetDownsampleBlock2D",) * 3,
            up_block_types=("ResnetUpsampleBlock2D",) * 3, add_attention=False)
  sr_first = _randomize(diffusers.UNet2DModel(**sr), 4, scale=0.05)
  sr_last = _randomize(diffusers.UNet2DModel(**sr), 5, scale=0.05)
  sched = diffusers.UnCLIPScheduler
  return diffusers.UnCLIPPipeline(
      prior=prior, decoder=decoder, text_proj=text_proj, text_encoder=text_encoder, tokenizer=tokenizer,
      super_res_first=sr_first, super_res_last=sr_last,
      prior_scheduler=sched(variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0),
      decoder_scheduler=sched(variance_type="learned_range", prediction_type="epsilon"),
      super_res_scheduler=sched(variance_type="fixed_small_log", prediction_type="epsilon"))


def _image_encoder():
  import transformers

  return _randomize(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
      hidden_size=E, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
      projection_dim=E, hidden_act="quick_gelu")), 6)


def _save_components(pipe, image_encoder, folder):
  for name in ("prior", "text_proj", "decoder", "super_res_first", "super_res_last", "text_encoder", "tokenizer"):
    getattr(pipe, name).save_pretrained(folder / name)
  for name in ("prior_scheduler", "decoder_scheduler", "super_res_scheduler"):
    getattr(pipe, name).save_pretrained(folder / name)
  image_encoder.save_pretrained(folder / "image_encoder")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("karlo")
  pipe = _tiny_pipeline()
  image_encoder = _image_encoder()
  _save_components(pipe, image_encoder, root / "src")
  assert convert.main(["karlo-diffusers", str(root / "src"), str(root / "bundle")]) == 0
  return pipe, root / "bundle", image_encoder


class _Noise:
  """Replaces the step noise `UnCLIPScheduler.step` draws with our samplers' arrays, in call order."""

  def __init__(self, queue):
    self.queue = [np.asarray(q) if q.ndim == 2 else np.asarray(q).transpose(0, 3, 1, 2) for q in queue]
    self.drawn = 0

  def __call__(self, shape, generator=None, device=None, dtype=None, **kw):
    want = self.queue[self.drawn]
    assert tuple(shape) == want.shape, f"step noise {self.drawn}: diffusers asks {tuple(shape)}, ours {want.shape}"
    self.drawn += 1
    return torch.from_numpy(want).to(dtype=dtype)

  def __enter__(self):
    self.original, scheduling_unclip.randn_tensor = scheduling_unclip.randn_tensor, self
    return self

  def __exit__(self, *exc):
    scheduling_unclip.randn_tensor = self.original


@pytest.mark.slow
@pytest.mark.parametrize("steps", [(25, 25, 7), (5, 4, 3)])
def test_text_to_image_matches_diffusers_pipeline(converted, steps):
  torch_pipe, bundle_dir, _ = converted
  prior_steps, decoder_steps, sr_steps = steps
  exact = {"single_step_beta": "schedule"}            # diffusers' UnCLIPScheduler β at the last respaced step
  ours = UnCLIP.from_bundle(bundle_dir, sampling={
      "prior": dict(exact, steps=str(prior_steps), num_candidates=1), "decoder": dict(exact, steps=str(decoder_steps)),
      "super_res": dict(exact, steps=str(sr_steps))})
  noise = StageNoise.from_key(jax.random.key(3))
  latent_rng, prior_noise_rng = jax.random.split(noise.prior_rng)
  prior_x_T = jax.random.normal(latent_rng, (B, E))
  noise.decoder_x_T = jax.random.normal(jax.random.key(4), (B, 16, 16, 3))
  noise.super_res_x_T = jax.random.normal(jax.random.key(5), (B, 32, 32, 3))
  queue = ([samplers.step_noise(prior_noise_rng, i, (B, E), jnp.float32) for i in range(prior_steps - 1)]
           + [samplers.step_noise(noise.decoder_rng, i, (B, 16, 16, 3), jnp.float32) for i in range(decoder_steps - 1)]
           + [samplers.step_noise(noise.super_res_rng, i, (B, 32, 32, 3), jnp.float32) for i in range(sr_steps - 1)])
  with _Noise(queue) as fake, torch.no_grad():
    want = torch_pipe(PROMPTS, prior_num_inference_steps=prior_steps, decoder_num_inference_steps=decoder_steps,
                      super_res_num_inference_steps=sr_steps, prior_guidance_scale=4.0, decoder_guidance_scale=8.0,
                      prior_latents=torch.from_numpy(np.asarray(prior_x_T)),
                      decoder_latents=torch.from_numpy(np.asarray(noise.decoder_x_T).transpose(0, 3, 1, 2)),
                      super_res_latents=torch.from_numpy(np.asarray(noise.super_res_x_T).transpose(0, 3, 1, 2)),
                      output_type="np").images
  assert fake.drawn == len(queue)
  noise.prior_x_T = prior_x_T
  got = ours.run(ours.encode_text(PROMPTS), noise)
  images = (np.asarray(got["images"]) + 1.0) / 2.0
  err = np.abs(images - want).max()
  print(f"UnCLIPPipeline {steps} steps: final images max|Δ| = {err:.2e} (pixel range {want.min():.2f}..{want.max():.2f})")
  assert want.std() > 0.05                            # a real image, not a constant
  np.testing.assert_allclose(images, want, atol=2e-3)


@pytest.mark.slow
def test_image_variations_match_diffusers_variation_pipeline(converted):
  """`UnCLIPImageVariationPipeline` (CLIP image embedding + the empty prompt, fresh decoder/super-res noise) vs our
  pipeline with the image's CLIP embedding (`manipulations.variations(latent="noise")`'s path)."""
  import transformers
  from PIL import Image

  from unclip_jax.inference import manipulations

  torch_pipe, bundle_dir, image_encoder = converted
  variation = diffusers.UnCLIPImageVariationPipeline(
      decoder=torch_pipe.decoder, text_encoder=torch_pipe.text_encoder, tokenizer=torch_pipe.tokenizer,
      text_proj=torch_pipe.text_proj, feature_extractor=transformers.CLIPImageProcessor(crop_size=32, size=32),
      image_encoder=image_encoder, super_res_first=torch_pipe.super_res_first,
      super_res_last=torch_pipe.super_res_last, decoder_scheduler=torch_pipe.decoder_scheduler,
      super_res_scheduler=torch_pipe.super_res_scheduler)
  exact = {"single_step_beta": "schedule"}
  ours = UnCLIP.from_bundle(bundle_dir, sampling={"decoder": dict(exact, steps="6"), "super_res": dict(exact, steps="3")})
  images = [(np.random.default_rng(k).random((40, 48, 3)) * 255).astype(np.uint8) for k in range(B)]
  noise = StageNoise.from_key(jax.random.key(8))
  noise.decoder_x_T = jax.random.normal(jax.random.key(9), (B, 16, 16, 3))
  noise.super_res_x_T = jax.random.normal(jax.random.key(10), (B, 32, 32, 3))
  queue = ([samplers.step_noise(noise.decoder_rng, i, (B, 16, 16, 3), jnp.float32) for i in range(5)]
           + [samplers.step_noise(noise.super_res_rng, i, (B, 32, 32, 3), jnp.float32) for i in range(2)])
  with _Noise(queue) as fake, torch.no_grad():
    want = variation([Image.fromarray(im) for im in images], decoder_num_inference_steps=6,
                     super_res_num_inference_steps=3, decoder_guidance_scale=8.0,
                     decoder_latents=torch.from_numpy(np.asarray(noise.decoder_x_T).transpose(0, 3, 1, 2)),
                     super_res_latents=torch.from_numpy(np.asarray(noise.super_res_x_T).transpose(0, 3, 1, 2)),
                     output_type="np").images
  assert fake.drawn == len(queue)
  z = ours.encode_image(images)
  got = ours.run(manipulations.empty_text(ours, B), noise, image_emb=z)
  out = (np.asarray(got["images"]) + 1.0) / 2.0
  err = np.abs(out - want).max()
  print(f"UnCLIPImageVariationPipeline: final images max|Δ| = {err:.2e}")
  assert want.std() > 0.05
  np.testing.assert_allclose(out, want, atol=2e-3)
