"""CLIP contrastive loss: single-device vs transformers' loss, sharded (8 CPU devices) vs single-device incl. grads."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from transformers.models.clip import modeling_clip

from unclip_jax.stages import clip as clip_losses


def _embeds(batch=16, dim=8, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((batch, dim)).astype(np.float32), rng.standard_normal((batch, dim)).astype(np.float32))


def _mesh(shape=(2, 2, 2), names=("data", "fsdp", "tensor")):
  devices = np.asarray(jax.devices()[:math.prod(shape)]).reshape(shape)
  return Mesh(devices, names, axis_types=(AxisType.Auto,) * len(names))


def test_single_device_matches_transformers():
  t, i = _embeds()
  scale = 2.6592
  got = clip_losses.contrastive_loss(jnp.asarray(t), jnp.asarray(i), jnp.float32(scale))
  tt, ti = torch.tensor(t), torch.tensor(i)
  tt, ti = tt / tt.norm(dim=-1, keepdim=True), ti / ti.norm(dim=-1, keepdim=True)
  logits_per_text = tt @ ti.T * math.exp(scale)
  want = modeling_clip.image_text_contrastive_loss(logits_per_text).item()
  print(f"loss vs transformers: |Δ| = {abs(float(got) - want):.2e}")
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  np.testing.assert_allclose(clip_losses.contrastive_logits(t, i, scale), logits_per_text.numpy(), rtol=1e-5)


def test_temperature_is_clamped_at_100():
  t, i = _embeds(batch=4)
  loss_fn = lambda s: clip_losses.contrastive_loss(t, i, s)
  hot, grad = jax.value_and_grad(loss_fn)(jnp.float32(6.0))
  np.testing.assert_allclose(hot, loss_fn(jnp.float32(math.log(100.0))), rtol=1e-6)
  assert float(grad) == 0.0
  assert float(jax.grad(loss_fn)(jnp.float32(1.0))) != 0.0
  np.testing.assert_allclose(clip_losses.temperature(jnp.float32(10.0)), 100.0, rtol=1e-6)


@pytest.mark.parametrize("mesh_shape,names", [((2, 2, 2), ("data", "fsdp", "tensor")), ((8,), ("data",))])
def test_sharded_loss_and_grads_match_single_device(mesh_shape, names):
  mesh = _mesh(mesh_shape, names)
  t, i = _embeds(batch=16, dim=8, seed=1)
  scale = jnp.float32(2.3)
  batch_sh = NamedSharding(mesh, P(tuple(n for n in names if n in ("data", "fsdp"))))
  ts, is_ = jax.device_put(t, batch_sh), jax.device_put(i, batch_sh)
  sharded = jax.jit(jax.value_and_grad(
      lambda a, b, s: clip_losses.sharded_contrastive_loss(a, b, s, mesh), argnums=(0, 1, 2)))
  single = jax.jit(jax.value_and_grad(clip_losses.contrastive_loss, argnums=(0, 1, 2)))
  (loss_s, grads_s) = sharded(ts, is_, scale)
  (loss_1, grads_1) = single(jnp.asarray(t), jnp.asarray(i), scale)
  assert loss_s.sharding.is_fully_replicated
  assert grads_s[0].sharding.is_equivalent_to(batch_sh, 2)
  errs = [abs(float(loss_s) - float(loss_1))] + [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                                                  for a, b in zip(grads_s, grads_1)]
  print(f"{mesh_shape}: |Δloss|={errs[0]:.1e} |Δgrad_text|={errs[1]:.1e} |Δgrad_image|={errs[2]:.1e} "
        f"|Δgrad_scale|={errs[3]:.1e}")
  assert max(errs) < 1e-5
  assert float(np.abs(np.asarray(grads_1[2]))) > 1e-3        # the scale gradient is not trivially zero


def test_sharded_bad_inputs():
  mesh = _mesh()
  t, i = _embeds(batch=6)
  with pytest.raises(ValueError, match="not divisible"):
    clip_losses.sharded_contrastive_loss(t, i, 1.0, mesh)
  with pytest.raises(ValueError, match=r"both be \[B, E\]"):
    clip_losses.sharded_contrastive_loss(t[:4], i[:2], 1.0, mesh)
  with pytest.raises(ValueError, match="none of the batch axes"):
    clip_losses.sharded_contrastive_loss(t, i, 1.0, _mesh((8,), ("x",)))
