"""The text-to-image pipeline driving the unCLIP paper's decoder (text_encoder "glide_clip": GLIDE's transformer
reads the caption's CLIP token ids, plus the CLIP image embedding), on a random tiny bundle."""
import jax
import numpy as np
import pytest

from helpers import build_tiny_bundle
from unclip_jax.inference import manipulations as M
from unclip_jax.inference.pipeline import UnCLIP
from unclip_jax.stages import decoder as decoder_stage

PAPER_DECODER = ["model.text_encoder='glide_clip'", "model.n_vocab=49408"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
  return UnCLIP.from_bundle(build_tiny_bundle(tmp_path_factory.mktemp("bundle"), decoder_overrides=PAPER_DECODER))


def test_generate_runs_the_paper_decoder(pipe):
  prompts = ["a red circle", "a blue square on a green background"]
  g = pipe.generate(prompts, seed=0, images_per_prompt=2, batch_size=3)
  assert g.images.shape == (4, 32, 32, 3) and g.prompt_index == [0, 0, 1, 1]
  np.testing.assert_array_equal(g.images, pipe.generate(prompts, seed=0, images_per_prompt=2, batch_size=3).images)
  assert (g.images[0] != g.images[1]).mean() > 0.5


def test_decode_is_the_stage_sampler_on_the_caption_tokens(pipe):
  """pipe.decode = the decoder stage's own sampler fed the tokenizer's ids and mask; the caption and the image
  embedding both change the image."""
  text = pipe.encode_text(["a red circle", "a green star"])
  ids, mask = pipe.tokenizer.tokenize(["a red circle", "a green star"])
  np.testing.assert_array_equal(np.asarray(text.ids), ids)
  z = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
  x_T = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
  got = np.asarray(pipe.decode(z, text, jax.random.key(4), x_T))
  dc = pipe.decoder_cfg
  models = decoder_stage.build(dc, dtype=pipe.dtype)
  sampler = decoder_stage.make_sampler(dc, models.unet, None, models.diffusion, text_encoder=models.text_encoder)
  want = np.asarray(sampler(pipe.decoder_params, decoder_stage.GlideClipCond(z, ids, mask), x_T, jax.random.key(4)))
  np.testing.assert_allclose(got, want, atol=2e-5)
  other_text = np.asarray(pipe.decode(z, pipe.encode_text(["a green star", "a red circle"]), jax.random.key(4), x_T))
  other_image = np.asarray(pipe.decode(-z, text, jax.random.key(4), x_T))
  assert np.abs(other_text - got).max() > 1e-3 and np.abs(other_image - got).max() > 1e-3


def test_variations_and_inversion_run(pipe):
  image = (np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8)
  out = M.variations(pipe, image, n=2, seed=0)
  assert out.shape == (2, 32, 32, 3)


def test_a_vocabulary_smaller_than_clips_is_refused(tmp_path):
  path = build_tiny_bundle(tmp_path, decoder_overrides=["model.text_encoder='glide_clip'"])   # tiny: 50 ids
  with pytest.raises(ValueError, match="n_vocab=50 but the pipeline feeds it CLIP token ids"):
    UnCLIP.from_bundle(path)
