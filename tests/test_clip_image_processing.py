"""CLIP preprocessing vs transformers `CLIPImageProcessor` (PIL backend without torchvision), and bad inputs."""
import numpy as np
import pytest
import transformers
from PIL import Image

from unclip_jax.data import image_processing


@pytest.fixture(scope="module")
def hf_processor():
  return transformers.CLIPImageProcessor()          # published CLIP defaults: 224 shortest side, crop 224


@pytest.mark.parametrize("shape", [(300, 400), (401, 257), (224, 224), (180, 500), (97, 130), (1000, 224)])
def test_matches_transformers(hf_processor, shape):
  rng = np.random.default_rng(sum(shape))
  image = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
  want = hf_processor(images=[image], return_tensors="np")["pixel_values"]            # [1, 3, 224, 224]
  got = image_processing.preprocess(image)
  assert got.shape == (1, 224, 224, 3) and got.dtype == np.float32
  err = np.max(np.abs(got - want.transpose(0, 2, 3, 1)))
  print(f"{shape}: max|Δ| = {err:.2e}")
  assert err < 1e-6


def test_batch_pil_and_small_sizes(hf_processor):
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in [(64, 48), (48, 80)]]
  pil = [Image.fromarray(images[0]), Image.fromarray(images[1]).convert("L")]
  proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  want = proc(images=pil, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  got = image_processing.preprocess(pil, size=32, crop_size=32)
  np.testing.assert_allclose(got, want, atol=1e-6)
  # A crop larger than the resized image is zero-padded, as in transformers.
  proc = transformers.CLIPImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 32, "width": 32})
  got = image_processing.preprocess(np.stack([images[0][:48, :48], images[1][:48, :48]]), size=20, crop_size=32)
  want = proc(images=[images[0][:48, :48], images[1][:48, :48]], return_tensors="np")["pixel_values"]
  np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), atol=1e-6)


def test_bad_inputs():
  with pytest.raises(ValueError, match="ndim=2"):
    image_processing.preprocess([np.zeros((8, 8), np.uint8)])
  with pytest.raises(ValueError, match="3 channels last"):
    image_processing.preprocess(np.zeros((8, 8, 4), np.uint8))
  with pytest.raises(ValueError, match="3 channels last"):
    image_processing.preprocess(np.zeros((1, 3, 8, 8), np.uint8))      # NCHW batch
  with pytest.raises(ValueError, match="dtype uint8"):
    image_processing.preprocess(np.zeros((8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="got shape"):
    image_processing.preprocess(np.zeros((2, 2, 8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match="PIL mode 'RGBA'"):
    image_processing.preprocess(Image.new("RGBA", (8, 8)))
