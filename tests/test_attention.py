"""Attention backend selection (XLA / cuDNN flash) and the cuDNN key layout, checked on CPU with XLA standing in.

cuDNN itself needs a CUDA GPU; what can fail here is our side of it: which calls "auto" sends to cuDNN, and that
the packed-keys-plus-lengths form the cuDNN path uses computes the same attention as diffusers' masked form.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.models import layers, unet as unet_lib
from unclip_jax.stages import builders

# Keep masks that are not prefixes (a kept key after a masked one), all kept, and one kept.
MASKS = np.array([[1, 0, 1, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0, 0]], bool)


def _qkv(seed=0, b=3, tq=5, s=7, h=2, d=8):
  r = np.random.default_rng(seed)
  return tuple(jnp.asarray(r.standard_normal(shape), jnp.float32)
               for shape in ((b, tq, h, d), (b, s, h, d), (b, s, h, d)))


def test_pack_kept_keys_moves_kept_keys_to_the_front_in_order():
  _, k, v = _qkv()
  pk, pv, lengths = layers.pack_kept_keys(k, v, jnp.asarray(MASKS))
  np.testing.assert_array_equal(lengths, MASKS.sum(-1))
  for row in range(len(MASKS)):
    n = MASKS[row].sum()
    np.testing.assert_array_equal(pk[row, :n], k[row, MASKS[row]])
    np.testing.assert_array_equal(pv[row, :n], v[row, MASKS[row]])


def test_packed_keys_with_lengths_equal_the_masked_attention():
  q, k, v = _qkv(1)
  bias = layers.attention_bias_from_mask(jnp.asarray(MASKS))[:, None, None, :]          # [B, 1, 1, S]
  want = layers.dot_product_attention(q, k, v, bias, implementation="xla")
  pk, pv, lengths = layers.pack_kept_keys(k, v, jnp.asarray(MASKS))
  got = layers.dot_product_attention(q, pk, pv, key_lengths=lengths, implementation="xla")
  np.testing.assert_allclose(got, want, atol=2e-6)
  unmasked = layers.dot_product_attention(q, k, v, implementation="xla")
  assert np.abs(np.asarray(unmasked) - np.asarray(want)).max() > 1e-2       # the mask matters in this example


@pytest.mark.parametrize("cuda,dtype,head_dim,has_bias,want", [
    (True, jnp.bfloat16, 64, False, "cudnn"), (True, jnp.float16, 128, False, "cudnn"),
    (True, jnp.float32, 64, False, "xla"),         # cuDNN flash attention is fp16/bf16 only
    (True, jnp.bfloat16, 160, False, "xla"),       # > 128 only on Hopper and later
    (True, jnp.bfloat16, 60, False, "xla"),        # not a multiple of 8
    (True, jnp.bfloat16, 64, True, "xla"),         # additive bias: XLA
    (False, jnp.bfloat16, 64, False, "xla"),       # CPU, TPU, ROCm
])
def test_auto_attention_rule(cuda, dtype, head_dim, has_bias, want):
  assert layers.auto_attention(cuda=cuda, dtype=dtype, head_dim=head_dim, has_bias=has_bias) == want


def test_resolve_attention_here_and_bad_names():
  assert jax.default_backend() == "cpu"
  assert layers.resolve_attention("auto", jnp.bfloat16, 64, has_bias=False) == "xla"
  assert layers.resolve_attention("xla", jnp.bfloat16, 64, has_bias=True) == "xla"
  with pytest.raises(ValueError, match="needs a CUDA GPU"):
    layers.resolve_attention("cudnn", jnp.bfloat16, 64, has_bias=False)
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
    layers.resolve_attention("flash", jnp.bfloat16, 64, has_bias=False)


# ---- the UNet's cuDNN layout ------------------------------------------------------------------------------------
def _tiny_unet(**kw):
  return unet_lib.UNet(in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       attention_levels=(False, True), mid_block_attention=True, head_dim=8, cross_attention_dim=12,
                       class_embed_type=None, norm_num_groups=8, **kw)


def _inputs(seed=0):
  r = np.random.default_rng(seed)
  x = jnp.asarray(r.standard_normal((3, 8, 8, 3)), jnp.float32)
  ctx = jnp.asarray(r.standard_normal((3, 7, 12)), jnp.float32)
  return x, jnp.asarray([3, 500, 999]), ctx, jnp.asarray(MASKS)


def _randomized(params, scale=0.3):
  leaves, tree = jax.tree.flatten(params)
  r = np.random.default_rng(1)
  return tree.unflatten([jnp.asarray(scale * r.standard_normal(x.shape), x.dtype) for x in leaves])


@pytest.fixture
def fake_cuda(monkeypatch):
  """Pretends the backend is a CUDA GPU and runs every 'cudnn' call with XLA; records what each call got."""
  calls = []
  attend = layers._attend

  def xla_for_cudnn(q, k, v, *, bias=None, key_lengths=None, implementation="xla"):
    calls.append({"impl": implementation, "bias": bias is not None, "lengths": key_lengths is not None,
                  "dtype": q.dtype})
    return attend(q, k, v, bias=bias, key_lengths=key_lengths, implementation="xla")

  monkeypatch.setattr(layers, "_is_cuda", lambda: True)
  monkeypatch.setattr(layers, "_attend", xla_for_cudnn)
  return calls


def test_unet_cudnn_layout_equals_the_diffusers_layout(fake_cuda):
  x, t, ctx, mask = _inputs()
  ref = _tiny_unet(attention="xla")
  params = ref.init(jax.random.key(0), x, t, encoder_hidden_states=ctx, attention_mask=mask)["params"]
  params = _randomized(params)                   # the init zeroes the output projections (attention would not count)
  want = ref.apply({"params": params}, x, t, encoder_hidden_states=ctx, attention_mask=mask)
  assert fake_cuda and all(c["impl"] == "xla" and c["bias"] for c in fake_cuda)
  fake_cuda.clear()
  got = _tiny_unet(attention="cudnn").apply({"params": params}, x, t, encoder_hidden_states=ctx, attention_mask=mask)
  assert len(fake_cuda) == 4                     # level 1: one down, two up (L+1); one in the mid block
  assert all(c["impl"] == "cudnn" and not c["bias"] and c["lengths"] for c in fake_cuda)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  unmasked = ref.apply({"params": params}, x, t, encoder_hidden_states=ctx)
  assert np.abs(np.asarray(unmasked) - np.asarray(want)).max() > 1e-2     # the text mask matters in this example


def test_unet_cudnn_layout_has_the_same_gradients(fake_cuda):
  """Training through the packed layout (a gather of the kept keys) gives the diffusers layout's gradients."""
  x, t, ctx, mask = _inputs(2)
  ref = _tiny_unet(attention="xla")
  params = _randomized(ref.init(jax.random.key(0), x, t, encoder_hidden_states=ctx, attention_mask=mask)["params"])

  def grads(net):
    loss = lambda p, c: jnp.mean(net.apply({"params": p}, x, t, encoder_hidden_states=c, attention_mask=mask) ** 2)
    return jax.grad(loss, argnums=(0, 1))(params, ctx)

  (want_p, want_c), (got_p, got_c) = grads(ref), grads(_tiny_unet(attention="cudnn"))
  assert any(c["impl"] == "cudnn" for c in fake_cuda)
  np.testing.assert_allclose(got_c, want_c, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(want_c)[~MASKS], 0.0)        # masked tokens get no gradient either way
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_p), jax.tree.leaves(want_p)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_unet_auto_picks_cudnn_only_in_half_precision(fake_cuda):
  x, t, ctx, mask = _inputs(1)
  net = _tiny_unet(attention="auto", dtype=jnp.bfloat16)
  params = jax.eval_shape(lambda: net.init(jax.random.key(0), x, t, encoder_hidden_states=ctx,
                                           attention_mask=mask))["params"]
  fake_cuda.clear()
  jax.eval_shape(lambda p: net.apply({"params": p}, x, t, encoder_hidden_states=ctx, attention_mask=mask), params)
  assert fake_cuda and all(c["impl"] == "cudnn" and c["dtype"] == jnp.bfloat16 for c in fake_cuda)
  fake_cuda.clear()
  jax.eval_shape(lambda p: net.clone(dtype=jnp.float32).apply({"params": p}, x, t, encoder_hidden_states=ctx,
                                                                attention_mask=mask), params)
  assert fake_cuda and all(c["impl"] == "xla" for c in fake_cuda)


def test_auto_falls_back_to_xla_when_cudnn_refuses(monkeypatch):
  """A trace-time refusal (old cuDNN, unsupported shape) under "auto" warns and runs XLA; "cudnn" raises it."""
  attend = layers._attend

  def refusing(q, k, v, *, implementation="xla", **kw):
    if implementation == "cudnn":
      raise NotImplementedError("cuDNN 8.8 is too old")
    return attend(q, k, v, implementation=implementation, **kw)

  monkeypatch.setattr(layers, "_is_cuda", lambda: True)
  monkeypatch.setattr(layers, "_attend", refusing)
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(2))
  with pytest.warns(RuntimeWarning, match="cuDNN 8.8 is too old"):
    got = layers.dot_product_attention(q, k, v)
  np.testing.assert_array_equal(got, layers.dot_product_attention(q, k, v, implementation="xla"))
  with pytest.raises(NotImplementedError, match="too old"):
    layers.dot_product_attention(q, k, v, implementation="cudnn")


def test_unet_rejects_an_unknown_attention():
  x, t, ctx, mask = _inputs()
  with pytest.raises(ValueError, match="unknown attention 'flash'"):
    _tiny_unet(attention="flash").init(jax.random.key(0), x, t, encoder_hidden_states=ctx, attention_mask=mask)


def test_decoder_config_attention_reaches_the_unet():
  from unclip_jax import config_lib

  cfg = config_lib.load_config("configs/decoder.py:tiny", ["model.attention=xla"])
  assert builders.unet(cfg.model).attention == "xla"
  assert builders.unet(config_lib.load_config("configs/decoder.py:tiny").model).attention == "auto"


# ---- Pallas splash attention (TPU kernel, run here in Pallas interpret mode) --------------------------------------
def _masked_xla(q, k, v, keep):
  """The XLA path with diffusers' additive -10000 bias on the masked keys."""
  bias = None if keep is None else layers.attention_bias_from_mask(keep)[:, None, None, :]
  return layers.dot_product_attention(q, k, v, bias, implementation="xla")


def _causal_xla(q, k, v):
  t = q.shape[1]
  bias = jnp.where(jnp.tril(jnp.ones((t, t), bool)), 0.0, -1e9)[None, None]
  return layers.dot_product_attention(q, k, v, bias, implementation="xla")


def _splash_keep(b, s, seed=0):
  """Random key masks [B, S] with at least one kept key per row (the splash kernel's precondition)."""
  keep = np.random.default_rng(seed).random((b, s)) > 0.4
  keep[:, -1] = True
  return jnp.asarray(keep)


@pytest.mark.parametrize("tq,s,masked", [
    (5, 7, True), pytest.param(130, 140, True, marks=pytest.mark.slow),     # slow: 2 x 2 blocks in interpret mode
    pytest.param(128, 256, False, marks=pytest.mark.slow)])
def test_splash_equals_xla_forward_and_gradients(tq, s, masked):
  """Lengths off the 128 grid (padded inside), on it, with and without a key mask: outputs and dq, dk, dv."""
  q, k, v = _qkv(3, b=2, tq=tq, s=s, h=2, d=8)
  keep = _splash_keep(2, s) if masked else None
  want = _masked_xla(q, k, v, keep)
  got = layers.splash_attention(q, k, v, keep)
  assert got.shape == want.shape == q.shape
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  g_want = jax.grad(loss(lambda *a: _masked_xla(*a, keep)), argnums=(0, 1, 2))(q, k, v)
  g_got = jax.grad(loss(lambda *a: layers.splash_attention(*a, keep)), argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip("qkv", g_got, g_want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")
  if masked:
    np.testing.assert_array_equal(np.asarray(g_got[1])[~np.asarray(keep)], 0.0)   # masked keys: no gradient
    assert np.abs(np.asarray(got) - np.asarray(_masked_xla(q, k, v, None))).max() > 1e-2   # the mask matters


def test_splash_causal_equals_xla():
  q, k, v = _qkv(4, b=2, tq=9, s=9, h=2, d=8)
  np.testing.assert_allclose(layers.splash_attention(q, k, v, causal=True), _causal_xla(q, k, v), atol=1e-5)
  g_want = jax.grad(lambda q: jnp.sum(_causal_xla(q, k, v) ** 2))(q)
  g_got = jax.grad(lambda q: jnp.sum(layers.splash_attention(q, k, v, causal=True) ** 2))(q)
  np.testing.assert_allclose(g_got, g_want, atol=1e-5)
  with pytest.raises(ValueError, match="as many queries as keys"):
    layers.splash_attention(q, k[:, :5], v[:, :5], causal=True)


def test_splash_under_a_mesh_runs_in_shard_map_with_the_same_result():
  """Batch over ('data', 'fsdp') and heads over 'tensor' (the logical rules), inside jit, on 8 CPU devices."""
  import flax.linen as nn
  from unclip_jax import config_lib
  from unclip_jax.parallel import mesh as mesh_lib

  q, k, v = _qkv(5, b=4, tq=20, s=30, h=2, d=8)
  keep = _splash_keep(4, 30, seed=1)
  want = _masked_xla(q, k, v, keep)
  g_want = jax.grad(lambda q: jnp.sum(_masked_xla(q, k, v, keep) ** 2))(q)
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  fn = jax.jit(lambda q, k, v, m: layers.splash_attention(q, k, v, m))
  with jax.set_mesh(mesh), nn.logical_axis_rules(config_lib.AXIS_RULES):
    assert layers._mesh_specs(jax.sharding.get_abstract_mesh(), 4, 2) == (("data", "fsdp"), ("tensor",))
    assert layers._mesh_specs(jax.sharding.get_abstract_mesh(), 2, 3) == (("data",), None)   # what divides
    assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v, keep))
    got = fn(q, k, v, keep)
    g_got = jax.jit(jax.grad(lambda q: jnp.sum(layers.splash_attention(q, k, v, keep) ** 2)))(q)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(g_got, g_want, atol=1e-5, rtol=1e-5)


def test_splash_bf16_is_close_to_xla():
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(6, b=2, tq=16, s=24, h=2, d=8))
  keep = _splash_keep(2, 24, seed=2)
  got = layers.splash_attention(q, k, v, keep)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(_masked_xla(q, k, v, keep), np.float32),
                             atol=2e-2)


@pytest.mark.parametrize("tpu,splash_ok,dtype,head_dim,has_bias,want", [
    (True, True, jnp.bfloat16, 64, False, "splash"), (True, True, jnp.float32, 128, False, "splash"),
    (True, False, jnp.bfloat16, 64, False, "xla"),        # the caller cannot give key masks
    (True, True, jnp.bfloat16, 64, True, "xla"),          # additive bias
    (True, True, jnp.bfloat16, 60, False, "xla"),         # not a multiple of 8
    (True, True, jnp.bfloat16, 512, False, "xla"),        # wider than one block
    (False, True, jnp.bfloat16, 64, False, "xla"),        # not a TPU
])
def test_auto_attention_rule_on_tpu(tpu, splash_ok, dtype, head_dim, has_bias, want):
  assert layers.auto_attention(cuda=False, dtype=dtype, head_dim=head_dim, has_bias=has_bias, tpu=tpu,
                               splash_ok=splash_ok) == want


def test_resolve_splash_here():
  assert layers.resolve_attention("auto", jnp.bfloat16, 64, has_bias=False, splash_ok=True) == "xla"   # CPU
  assert layers.resolve_attention("splash", jnp.float32, 8, has_bias=False, splash_ok=True) == "splash"
  with pytest.raises(ValueError, match="multiple of 8 and at most 256, got 12"):
    layers.resolve_attention("splash", jnp.float32, 12, has_bias=False)
  q, k, v = _qkv(7)
  with pytest.raises(ValueError, match="takes key masks, not an additive bias"):
    layers.dot_product_attention(q, k, v, jnp.zeros((3, 1, 1, 7)), implementation="splash")
  lengths = jnp.asarray([2, 7, 4])
  np.testing.assert_allclose(layers.dot_product_attention(q, k, v, key_lengths=lengths, implementation="splash"),
                             layers.dot_product_attention(q, k, v, key_lengths=lengths, implementation="xla"),
                             atol=1e-5)


def _unet_pair(seed):
  x, t, ctx, mask = _inputs(seed)
  ref = _tiny_unet(attention="xla")
  params = _randomized(ref.init(jax.random.key(0), x, t, encoder_hidden_states=ctx, attention_mask=mask)["params"])
  return ref, _tiny_unet(attention="splash"), params, (x, t, ctx, mask)


def test_unet_splash_equals_xla():
  """The tiny UNet's self + cross attention (text-mask key padding, L+1 up blocks, mid block) with the kernel."""
  ref, net, params, (x, t, ctx, mask) = _unet_pair(3)
  want = ref.apply({"params": params}, x, t, encoder_hidden_states=ctx, attention_mask=mask)
  got = jax.jit(net.apply)({"params": params}, x, t, encoder_hidden_states=ctx, attention_mask=mask)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_unet_splash_has_the_xla_gradients():
  """Gradients through the kernel's fused backward in the UNet (~50 s: interpret mode of 4 layers' kernels)."""
  ref, net, params, (x, t, ctx, mask) = _unet_pair(4)

  def loss(n):
    return lambda p, c: jnp.mean(n.apply({"params": p}, x, t, encoder_hidden_states=c, attention_mask=mask) ** 2)

  (want_p, want_c), (got_p, got_c) = (jax.jit(jax.grad(loss(n), argnums=(0, 1)))(params, ctx) for n in (ref, net))
  np.testing.assert_allclose(got_c, want_c, atol=1e-6, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(got_c)[~MASKS], 0.0)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_p), jax.tree.leaves(want_p)):
    np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_unet_auto_picks_splash_on_tpu(monkeypatch):
  """"auto" on a TPU (a context mesh of TPU chips, as the compile-only preflight traces) routes every UNet
  attention to the kernel (CLIP and the prior: tests/test_attention_towers.py); a call with an additive bias
  stays XLA."""
  calls = []
  splash = layers.splash_attention

  def recording(q, k, v, key_mask=None, **kw):
    calls.append(key_mask is not None)
    return splash(q, k, v, key_mask, **kw)

  monkeypatch.setattr(layers, "_platform", lambda: "tpu")
  monkeypatch.setattr(layers, "_splash_placeable", lambda: True)
  monkeypatch.setattr(layers, "splash_attention", recording)
  x, t, ctx, mask = _inputs(1)
  net = _tiny_unet(attention="auto")
  params = jax.eval_shape(lambda: net.init(jax.random.key(0), x, t, encoder_hidden_states=ctx,
                                           attention_mask=mask))["params"]
  calls.clear()
  jax.eval_shape(lambda p: net.apply({"params": p}, x, t, encoder_hidden_states=ctx, attention_mask=mask), params)
  assert calls == [True] * 4
  assert layers.resolve_attention("auto", jnp.bfloat16, 64, has_bias=True) == "xla"
  monkeypatch.setattr(layers, "_splash_placeable", lambda: False)        # several chips and no mesh: XLA
  assert layers.resolve_attention("auto", jnp.bfloat16, 64, has_bias=False, splash_ok=True) == "xla"


def test_pipeline_traces_its_unet_stages_under_its_mesh():
  """`UnCLIP` jits its UNet stages through `_under_mesh`: with 8 devices and no `jax.set_mesh`, the kernel still
  runs inside shard_map over the pipeline's ("data",) mesh, rows sharded, equal to XLA."""
  import types

  from unclip_jax.inference.pipeline import UnCLIP, data_mesh

  mesh = data_mesh(jax.devices())
  assert mesh.size == 8
  q, k, v = _qkv(8, b=8, tq=6, s=10, h=2, d=8)
  keep = _splash_keep(8, 10, seed=3)
  fn = jax.jit(UnCLIP._under_mesh(types.SimpleNamespace(mesh=mesh), layers.splash_attention))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  args = jax.device_put((q, k, v, keep), rows)
  assert "shard_map" in str(jax.make_jaxpr(fn)(*args))
  got = fn(*args)
  assert got.sharding.spec[0] == "data"
  np.testing.assert_allclose(got, _masked_xla(q, k, v, keep), atol=1e-5, rtol=1e-5)
