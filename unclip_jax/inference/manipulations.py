"""unCLIP's image manipulations (paper §3): variations, interpolations, text diffs, and inpainting.

Every manipulation works on the bipartite latent (z_i, x_T): the CLIP image embedding z_i and the decoder's DDIM
latent x_T, obtained by DDIM-inverting the (decoder-size) image conditioned on z_i.
  variations      decode (z_i, x_T) with DDIM η > 0: the embedding keeps the semantics, η adds variety
  interpolate     z_θ = slerp(z_1, z_2, θ); x_T slerped between both inversions, or one fixed noise (η = 0)
  text_diff       z_d = norm(z_t − z_t0) of a caption change; z_θ = slerp(z_i, z_d, θ), θ ∈ [0, θ_max] (η = 0)
  inpaint         prompt -> prior -> decoder with the known pixels held (RePaint, or GLIDE's inpaint channels)
The decoder sees the empty prompt's text encoding, as in diffusers' UnCLIPImageVariationPipeline, except for
inpainting, which is text-driven. Embeddings are slerped as unit vectors and rescaled to the interpolated norm.
Each function returns uint8 images [N, H, W, 3] at the pipeline's final size.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from unclip_jax.inference.images import from_uint8, to_uint8
from unclip_jax.inference.pipeline import StageNoise, TextEncoding, UnCLIP


def slerp(a: jax.Array, b: jax.Array, theta) -> jax.Array:
  """Spherical interpolation of the directions of a, b [..., D] at theta (scalar or [N]) -> [N?, ..., D].

  The norm is interpolated linearly, so slerp(a, b, 0) = a and slerp(a, b, 1) = b exactly."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  theta = jnp.asarray(theta, jnp.float32)
  t = theta.reshape(theta.shape + (1,) * a.ndim)
  na, nb = jnp.linalg.norm(a, axis=-1, keepdims=True), jnp.linalg.norm(b, axis=-1, keepdims=True)
  ua, ub = a / jnp.maximum(na, 1e-12), b / jnp.maximum(nb, 1e-12)
  omega = jnp.arccos(jnp.clip(jnp.sum(ua * ub, -1, keepdims=True), -1.0, 1.0))
  so = jnp.sin(omega)
  small = so < 1e-6                                              # (anti)parallel: fall back to lerp of directions
  wa = jnp.where(small, 1.0 - t, jnp.sin((1.0 - t) * omega) / jnp.where(small, 1.0, so))
  wb = jnp.where(small, t, jnp.sin(t * omega) / jnp.where(small, 1.0, so))
  u = wa * ua + wb * ub
  u = u / jnp.maximum(jnp.linalg.norm(u, axis=-1, keepdims=True), 1e-12)
  return u * ((1.0 - t) * na + t * nb)


def _as_rgb_array(image, what: str) -> np.ndarray:
  if isinstance(image, Image.Image):
    image = np.asarray(image.convert("RGB"))
  arr = np.asarray(image)
  if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
    raise ValueError(f"{what} must be a uint8 RGB image [H, W, 3], got {arr.dtype} {arr.shape}")
  return arr


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> [size, size, 3] (bicubic, no crop: pass square images to keep the aspect)."""
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def _ddim(pipe: UnCLIP, eta: float) -> UnCLIP:
  """`pipe` with its decoder sampling DDIM at `eta` (same respacing, same weights)."""
  return pipe.with_sampling(decoder={"sampler": "ddim", "eta": float(eta)})


def empty_text(pipe: UnCLIP, n: int) -> TextEncoding:
  """The empty prompt's CLIP encoding, n rows (the decoder text of every manipulation but inpainting)."""
  return pipe.encode_text([""]).repeat(n)


def bipartite_latent(pipe: UnCLIP, image) -> tuple[jax.Array, jax.Array]:
  """(z_i [1, E], x_T [1, s, s, 3]) of an image: CLIP embedding and its DDIM inversion at the decoder size s."""
  arr = _as_rgb_array(image, "image")
  z = pipe.encode_image([arr])
  small = jnp.asarray(from_uint8(resize(arr, pipe.decoder_size)))[None]
  return z, pipe.invert(small, z, empty_text(pipe, 1))


def _finish(pipe: UnCLIP, z: jax.Array, x_T: jax.Array, text: TextEncoding, seed: int, eta: float) -> np.ndarray:
  key = jax.random.key(seed)
  low = _ddim(pipe, eta).decode(z, text, jax.random.fold_in(key, 0), x_T)
  return to_uint8(pipe.upsample(low, jax.random.fold_in(key, 1)))


def variations(pipe: UnCLIP, image, n: int = 4, *, eta: float = 1.0, seed: int = 0,
               latent: str = "inverted") -> np.ndarray:
  """n variations of an image.

  latent="inverted" (the paper): its bipartite latent (z_i, x_T) decoded with DDIM at `eta` (η > 0 for variety;
  η = 0 reconstructs the image). latent="noise" (diffusers' UnCLIPImageVariationPipeline): z_i with fresh x_T and
  the decoder's configured sampler.
  """
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  if latent not in ("inverted", "noise"):
    raise ValueError(f"latent must be 'inverted' or 'noise', got {latent!r}")
  if latent == "noise":
    z = jnp.repeat(pipe.encode_image([_as_rgb_array(image, "image")]), n, 0)
    return to_uint8(pipe.run(empty_text(pipe, n), StageNoise.from_key(jax.random.key(seed)), image_emb=z)["images"])
  z, x_T = bipartite_latent(pipe, image)
  return _finish(pipe, jnp.repeat(z, n, 0), jnp.repeat(x_T, n, 0), empty_text(pipe, n), seed, eta)


def interpolate(pipe: UnCLIP, image_a, image_b, n: int = 5, *, latent: str = "slerp", seed: int = 0) -> np.ndarray:
  """n frames from image_a to image_b: slerp of the CLIP embeddings; x_T slerped between both DDIM inversions
  (`latent="slerp"`) or one random x_T for every frame (`latent="fixed"`); decoded with DDIM η = 0."""
  if n < 2:
    raise ValueError(f"n must be >= 2 (both ends), got {n}")
  if latent not in ("slerp", "fixed"):
    raise ValueError(f"latent must be 'slerp' or 'fixed', got {latent!r}")
  (za, xa), (zb, xb) = bipartite_latent(pipe, image_a), bipartite_latent(pipe, image_b)
  theta = jnp.linspace(0.0, 1.0, n)
  z = slerp(za[0], zb[0], theta)
  if latent == "slerp":
    x_T = slerp(xa.reshape(-1), xb.reshape(-1), theta).reshape((n,) + xa.shape[1:])
  else:
    x_T = jnp.repeat(jax.random.normal(jax.random.key(seed + 1), xa.shape), n, 0)
  return _finish(pipe, z, x_T, empty_text(pipe, n), seed, 0.0)


def text_diff(pipe: UnCLIP, image, caption: str, target: str, n: int = 5, *, max_theta: float = 0.5,
              seed: int = 0) -> np.ndarray:
  """Edits an image toward a caption change: z_d = norm(z_t(target) − z_t(caption)); frames slerp(z_i, z_d, θ)
  for θ in linspace(0, max_theta, n), all decoded from the image's own DDIM latent with η = 0."""
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  if not 0.0 <= max_theta <= 1.0:
    raise ValueError(f"max_theta must be in [0, 1], got {max_theta}")
  z, x_T = bipartite_latent(pipe, image)
  t = pipe.encode_text([caption, target]).emb
  d = t[1] - t[0]
  if float(jnp.linalg.norm(d)) < 1e-6:
    raise ValueError(f"caption {caption!r} and target {target!r} have the same CLIP text embedding")
  z_d = d / jnp.linalg.norm(d) * jnp.linalg.norm(z[0])          # the direction only; keep the image's norm
  frames = slerp(z[0], z_d, jnp.linspace(0.0, max_theta, n))
  return _finish(pipe, frames, jnp.repeat(x_T, n, 0), empty_text(pipe, n), seed, 0.0)


def inpaint(pipe: UnCLIP, image, mask, prompt: str, n: int = 1, *, seed: int = 0, paste: bool = True) -> np.ndarray:
  """Fills the unknown region (mask 0) of an image to match a prompt.

  The prior turns the prompt into image embeddings; the decoder holds the known pixels (mask 1) with RePaint
  resampling, or through GLIDE's inpaint channels when the decoder has them (`stages.decoder.sample`); the upsampler
  refines. With `paste`, known pixels of the original are put back at the final size.
  Args:
    image: uint8 [H, W, 3]; mask: [H, W] (bool, or uint8/float with nonzero = known), same H, W as the image.
  """
  arr = _as_rgb_array(image, "image")
  m = np.asarray(mask)
  if m.ndim == 3 and m.shape[-1] == 1:
    m = m[..., 0]
  if m.shape != arr.shape[:2]:
    raise ValueError(f"mask must be [H, W] = {arr.shape[:2]} like the image, got {m.shape}")
  if not isinstance(prompt, str) or n < 1:
    raise ValueError("inpaint needs a prompt string and n >= 1")
  known = (m > (127 if m.dtype == np.uint8 else 0.5)).astype(np.float32)
  s = pipe.decoder_size
  small = from_uint8(resize(arr, s))
  small_mask = np.asarray(Image.fromarray((known * 255).astype(np.uint8)).resize((s, s), Image.NEAREST)) > 127
  key = jax.random.key(seed)
  text = pipe.encode_text([prompt] * n)
  z = pipe.sample_prior(text, jax.random.fold_in(key, 0))
  low = pipe.decode(z, text, jax.random.fold_in(key, 1),
                    inpaint_image=jnp.asarray(np.repeat(small[None], n, 0)),
                    inpaint_mask=jnp.asarray(np.repeat(small_mask[None, ..., None], n, 0).astype(np.float32)))
  out = to_uint8(pipe.upsample(low, jax.random.fold_in(key, 2)))
  if paste:
    size = out.shape[1]
    big = resize(arr, size)
    big_mask = np.asarray(Image.fromarray((known * 255).astype(np.uint8)).resize((size, size), Image.NEAREST)) > 127
    out = np.where(big_mask[None, ..., None], big[None], out)
  return out


def load_image(path: str) -> np.ndarray:
  """An image file -> uint8 RGB [H, W, 3]; unreadable files raise a ValueError naming the path."""
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except FileNotFoundError:
    raise FileNotFoundError(f"image not found: {path}") from None
  except Exception as e:                                           # PIL raises several types for corrupt data
    raise ValueError(f"cannot read image {path}: {e}") from e


def load_mask(path: str, shape: Sequence[int]) -> np.ndarray:
  """A mask image (white = known pixel) -> bool [H, W]; its size must equal the image's `shape[:2]`."""
  try:
    with Image.open(path) as im:
      m = np.asarray(im.convert("L")) > 127
  except FileNotFoundError:
    raise FileNotFoundError(f"mask not found: {path}") from None
  except Exception as e:
    raise ValueError(f"cannot read mask {path}: {e}") from e
  if m.shape != tuple(shape[:2]):
    raise ValueError(f"mask {path} is {m.shape[1]}x{m.shape[0]} but the image is {shape[1]}x{shape[0]}")
  return m
