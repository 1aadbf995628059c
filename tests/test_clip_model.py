"""CLIP module: config variants and published sizes, sharded init on an FSDP mesh, bf16 and remat paths."""
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from unclip_jax import config_lib
from unclip_jax.models import clip as clip_lib
from unclip_jax.stages import builders

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "clip.py")


def _n_params(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("variant,text_m,vision_m", [("vit_l14", 123.65, 303.97), ("vit_b32", 63.43, 87.85)])
def test_published_sizes(variant, text_m, vision_m):
  """Parameter counts of the OpenAI models (text tower + projection, image tower + projection, logit_scale)."""
  cfg = config_lib.load_config(f"{CONFIG}:{variant}")
  model = builders.clip(cfg.model)
  shapes = builders.abstract(builders.init_clip, model)
  text = _n_params({k: shapes[k] for k in ("text_model", "text_projection")})
  vision = _n_params({k: shapes[k] for k in ("vision_model", "visual_projection")})
  assert abs(text / 1e6 - text_m) < 0.01 and abs(vision / 1e6 - vision_m) < 0.01, (text, vision)
  assert shapes["logit_scale"].shape == ()
  assert shapes["vision_model"]["embeddings"]["patch_embedding"]["kernel"].dtype == jnp.float32


def test_sharded_init_and_forward_match_unsharded():
  cfg = config_lib.load_config(f"{CONFIG}:tiny")
  model = builders.clip(cfg.model)
  # tensor=1: the tiny sizes (vocab 99, mlp 37, as transformers' tests use) are odd, so not tensor-shardable.
  devices = np.asarray(jax.devices()[:8]).reshape(2, 4, 1)
  mesh = Mesh(devices, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  ids, px = builders.clip_dummy_inputs(model, batch=8)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 99, ids.shape), jnp.int32)
  px = jnp.asarray(np.random.default_rng(1).standard_normal(px.shape), jnp.float32)
  init = lambda rng: model.init(rng, *builders.clip_dummy_inputs(model))
  with jax.set_mesh(mesh), nn.logical_axis_rules(cfg.axis_rules):
    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, cfg.axis_rules)
    variables = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    q = variables["params"]["text_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"].value
    assert q.sharding.spec == P("fsdp", "tensor") and not q.sharding.is_fully_replicated
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    fwd = jax.jit(lambda v, i, x: model.apply(v, i, x))
    out = fwd(variables, jax.device_put(ids, batch), jax.device_put(px, batch))
  plain = model.apply(nn.unbox(jax.device_get(variables)), ids, px)
  for k in plain:
    np.testing.assert_allclose(out[k], plain[k], atol=2e-6, err_msg=k)


def test_bf16_and_remat_paths():
  cfg = config_lib.load_config(f"{CONFIG}:tiny")
  model = builders.clip(cfg.model)
  params = builders.init_clip(model, jax.random.key(1))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 99, (2, 16)), jnp.int32)
  px = jnp.asarray(np.random.default_rng(1).standard_normal((2, 30, 30, 3)), jnp.float32)
  ref = jax.jit(model.apply)({"params": params}, ids, px)
  bf16 = jax.jit(builders.clip(cfg.model, dtype="bfloat16").apply)({"params": params}, ids, px)
  for k in ("text_embeds", "image_embeds"):
    assert bf16[k].dtype == jnp.float32
    np.testing.assert_allclose(bf16[k], ref[k], atol=5e-2 * float(jnp.abs(ref[k]).max()))
  remat = builders.clip(cfg.model, remat="full")
  loss = lambda m: (lambda p: jnp.sum(m.apply({"params": p}, ids, px)["text_embeds"] ** 2))
  g_ref, g_remat = jax.jit(jax.grad(loss(model)))(params), jax.jit(jax.grad(loss(remat)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_ref, g_remat)


def test_config_errors():
  with pytest.raises(ValueError, match="logit_scale needs both towers"):
    builders.init_clip(clip_lib.CLIP(clip_lib.CLIPConfig(vision=None)), jax.random.key(0))
  with pytest.raises(ValueError, match="at least one tower"):
    builders.init_clip(clip_lib.CLIP(clip_lib.CLIPConfig(text=None, vision=None, logit_scale=False)),
                         jax.random.key(0))
