"""Upsampler training degradations: blur, down-up resize, JPEG-like quantization, random crops, training pairs."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft
import scipy.ndimage

from unclip_jax import config_lib
from unclip_jax.data import degradations as deg

ROOT = os.path.join(os.path.dirname(__file__), "..")


def smooth_images(b=2, size=64, seed=0):
  rng = np.random.default_rng(seed)
  x = scipy.ndimage.gaussian_filter(rng.standard_normal((b, size, size, 3)), (0, 3, 3, 0))
  return jnp.asarray(np.clip(x / np.abs(x).max(), -1, 1), jnp.float32)


def test_gaussian_blur_matches_scipy_correlation():
  img = np.random.default_rng(0).standard_normal((12, 10, 3)).astype(np.float32)
  k = np.asarray(deg.gaussian_kernel1d(jnp.float32(1.3), 7))
  assert abs(k.sum() - 1) < 1e-6 and np.argmax(k) == 3
  want = scipy.ndimage.correlate1d(scipy.ndimage.correlate1d(img, k, axis=0, mode="mirror"), k, axis=1,
                                   mode="mirror")
  np.testing.assert_allclose(deg.gaussian_blur(jnp.asarray(img), jnp.float32(1.3), 7), want, atol=1e-5)
  np.testing.assert_allclose(deg.gaussian_blur(jnp.asarray(img), jnp.float32(0.0), 7), img, atol=1e-6)


def test_dct_and_jpeg_tables():
  d = deg.dct_matrix()
  np.testing.assert_allclose(d @ d.T, np.eye(8), atol=1e-6)
  x = np.random.default_rng(1).standard_normal((8, 8))
  np.testing.assert_allclose(d @ x @ d.T, scipy.fft.dctn(x, norm="ortho"), atol=1e-5)
  t = np.asarray(deg.jpeg_tables(jnp.float32(50.0)))
  assert t[0, 0, 0] == 16 and t[1, 0, 0] == 17 and t[2, 7, 7] == 99       # quality 50 = the base tables
  assert np.asarray(deg.jpeg_tables(jnp.float32(100.0))).max() == 1


def test_jpeg_quantize():
  img = smooth_images(1, 32)[0]
  hi = deg.jpeg_quantize(img, jnp.float32(100.0))
  lo = deg.jpeg_quantize(img, jnp.float32(10.0))
  err_hi, err_lo = float(jnp.abs(hi - img).max()), float(jnp.abs(lo - img).mean())
  assert err_hi < 0.03, err_hi                    # rounding DCT coefficients to integers only
  assert err_lo > 5 * float(jnp.abs(hi - img).mean())
  assert float(jnp.abs(lo).max()) <= 1.0
  flat = jnp.full((20, 12, 3), 0.2)               # non-multiple-of-8 sizes are padded and cropped back
  np.testing.assert_allclose(deg.jpeg_quantize(flat, jnp.float32(30.0)), flat, atol=0.02)


def test_down_up_keeps_geometry():
  ramp = jnp.broadcast_to(jnp.linspace(-1, 1, 32)[:, None, None], (32, 32, 3))
  for method in range(len(deg.RESIZE_METHODS)):
    out = deg.down_up(ramp, jnp.float32(0.5), method, method)
    assert float(jnp.abs(out - ramp).max()) < 0.05                    # edge rows: the padding softens the ends
    assert float(jnp.abs(out - ramp)[2:-2].max()) < 0.02              # no shift of the content
  sharp = jnp.asarray(np.random.default_rng(2).standard_normal((32, 32, 3)), jnp.float32)
  assert float(jnp.abs(deg.down_up(sharp, jnp.float32(0.5), 1, 1) - sharp).mean()) > 0.3


def test_random_crop_windows():
  imgs = jnp.arange(2 * 16 * 16, dtype=jnp.float32).reshape(2, 16, 16, 1)
  crops = deg.random_crop(jax.random.key(0), imgs, 4)
  assert crops.shape == (2, 4, 4, 1)
  for b in range(2):
    y, x = divmod(int(crops[b, 0, 0, 0]) - b * 256, 16)
    np.testing.assert_array_equal(crops[b], imgs[b, y:y + 4, x:x + 4])
  np.testing.assert_array_equal(crops, deg.random_crop(jax.random.key(0), imgs, 4))
  with pytest.raises(ValueError, match="exceeds"):
    deg.random_crop(jax.random.key(0), imgs, 17)


@pytest.mark.parametrize("kind", ["blur", pytest.param("bsr", marks=pytest.mark.slow)])
def test_training_pair(kind):
  imgs = smooth_images(4, 64)
  fn = jax.jit(lambda k, x: deg.training_pair(k, x, image_size=64, low_res_size=16, crop_fraction=0.5,
                                              degradation=kind))
  target, low = fn(jax.random.key(0), imgs)
  assert target.shape == (4, 32, 32, 3) and low.shape == (4, 8, 8, 3)
  assert float(jnp.abs(low).max()) <= 1.0 + 1e-6
  ref = jax.image.resize(target, low.shape, "bicubic", antialias=True)
  err = float(jnp.abs(low - ref).mean())
  assert 0 < err < 0.3, err                              # degraded, but still the same picture
  t2, l2 = fn(jax.random.key(0), imgs)
  np.testing.assert_array_equal(low, l2)
  _, l3 = fn(jax.random.key(1), imgs)
  assert float(jnp.abs(l3 - low).max()) > 0


def test_training_pair_from_config():
  cfg = config_lib.load_config(os.path.join(ROOT, "configs/upsampler.py:tiny"))
  fn = deg.training_pair_from_config(cfg)                # 32 -> 16, crops of 1/4 = 8 px, low-res 4 px
  target, low = fn(jax.random.key(0), smooth_images(2, 32))
  assert target.shape == (2, 8, 8, 3) and low.shape == (2, 4, 4, 3)
  with pytest.raises(ValueError, match="unknown degradation"):
    deg.training_pair(jax.random.key(0), smooth_images(1, 32), image_size=32, low_res_size=16, degradation="x")
  with pytest.raises(ValueError, match="multiple of the scale factor"):
    deg.training_pair(jax.random.key(0), smooth_images(1, 32), image_size=32, low_res_size=8, crop_fraction=0.2)
