"""The CLIP towers and the diffusion prior on the Pallas splash kernel (`layers.self_attention`), run here in Pallas
interpret mode, against XLA with their additive biases; what "auto" picks for them; the config field.

Sizes are tiny (one 128 block per sequence) because interpret mode is slow. Right-padded text masks as the
tokenizer gives them (BOS always kept); the prior's include the null conditioning's all-False row, whose text
positions have no key to attend to (models/prior.py: they never reach the output).
"""
import json
import pathlib
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import config_lib
from unclip_jax.models import clip as clip_lib, layers, prior as prior_lib
from unclip_jax.stages import builders

ROOT = pathlib.Path(__file__).resolve().parent.parent

OUT_TOL = 1e-5          # float32 outputs, absolute
GRAD_RTOL = 1e-4        # parameter gradients, relative to the leaf's largest reference entry

TEXT = clip_lib.TextConfig(vocab_size=99, width=32, layers=2, heads=4, mlp_dim=37, context_length=12)
VISION = clip_lib.VisionConfig(image_size=8, patch_size=2, width=32, layers=2, heads=4, mlp_dim=37)   # 17 tokens
TEXT_LENGTHS = (12, 5, 1)                   # full, padded, BOS only
PRIOR_LENGTHS = (6, 3, 0, 1)                # full, padded, the null conditioning (all False), one token


def _randomized(params, seed, scale=0.3):
  """Params of the same tree, normal(0, scale) (the inits zero biases, so masks would matter less)."""
  leaves, tree = jax.tree.flatten(params)
  r = np.random.default_rng(seed)
  return tree.unflatten([jnp.asarray(scale * r.standard_normal(x.shape), jnp.float32) for x in leaves])


def _prefix_mask(lengths, size):
  return jnp.asarray(np.arange(size)[None] < np.asarray(lengths)[:, None])


def _clip(attention, **kw):
  return clip_lib.CLIP(clip_lib.CLIPConfig(text=TEXT, vision=VISION, projection_dim=16, attention=attention), **kw)


@pytest.fixture(scope="module")
def clip_case():
  r = np.random.default_rng(0)
  ids = jnp.asarray(r.integers(1, TEXT.vocab_size, (3, TEXT.context_length)), jnp.int32)
  pixels = jnp.asarray(r.standard_normal((2, 8, 8, 3)), jnp.float32)
  params = _randomized(jax.eval_shape(lambda: builders.init_clip(_clip("xla"), jax.random.key(0))), 1)
  return params, ids, _prefix_mask(TEXT_LENGTHS, TEXT.context_length), pixels


def _prior(attention, head_dim=8, **kw):
  return prior_lib.PriorTransformer(embedding_dim=16, num_embeddings=6, num_layers=2, num_heads=2, head_dim=head_dim,
                                    attention=attention, **kw)


@pytest.fixture(scope="module")
def prior_case():
  r = np.random.default_rng(2)
  b, l, e = len(PRIOR_LENGTHS), 6, 16
  args = (jnp.asarray(r.standard_normal((b, e)), jnp.float32), jnp.asarray([3, 200, 500, 999]),
          jnp.asarray(r.standard_normal((b, e)), jnp.float32), jnp.asarray(r.standard_normal((b, l, e)), jnp.float32),
          _prefix_mask(PRIOR_LENGTHS, l))
  params = _randomized(jax.eval_shape(lambda: builders.init_prior(_prior("xla"), jax.random.key(0))), 3)
  return params, args


def _max_diff(got, want) -> float:
  return max(float(np.abs(np.asarray(g) - np.asarray(w)).max()) for g, w in zip(jax.tree.leaves(got),
                                                                               jax.tree.leaves(want)))


def _check_grads(got, want) -> float:
  """Per leaf: max |got - want| <= GRAD_RTOL · the leaf's largest |want|, floored at 1e-3 of the largest gradient
  of all (k_proj / to_k biases have zero gradient up to rounding: a per-query constant logit). Returns the worst
  ratio max |got - want| / that scale."""
  floor = 1e-3 * max(float(np.abs(np.asarray(w)).max()) for w in jax.tree.leaves(want))
  worst = 0.0
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    scale = max(float(np.abs(np.asarray(w)).max()), floor)
    err = float(np.abs(np.asarray(g) - np.asarray(w)).max())
    assert err <= GRAD_RTOL * scale, f"{jax.tree_util.keystr(path)}: {err} vs scale {scale}"
    worst = max(worst, err / scale)
  return worst


# ---- splash == XLA --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("masked", [False, True])
def test_clip_text_tower_splash_equals_xla(clip_case, masked):
  """Causal (+ padding mask) text tower: last_hidden_state at every position incl. padding, pooled, gradients."""
  params, ids, mask, _ = clip_case
  mask = mask if masked else None
  encode = lambda m: lambda p: m.apply({"params": p}, ids, mask, method=clip_lib.CLIP.encode_text)
  want, got = (jax.jit(encode(_clip(a)))(params) for a in ("xla", "splash"))
  diff = _max_diff(got, want)
  print(f"clip text (mask={masked}): max |splash - xla| = {diff:.2e}")
  assert diff <= OUT_TOL
  loss = lambda m: lambda p: jnp.sum(jnp.sin(encode(m)(p)[0])) + jnp.mean(encode(m)(p)[1] ** 2)
  g_want, g_got = (jax.jit(jax.grad(loss(_clip(a))))(params) for a in ("xla", "splash"))
  print(f"clip text (mask={masked}): worst relative gradient difference {_check_grads(g_got, g_want):.2e}")
  if masked:                                   # the mask matters in this example
    unmasked = jax.jit(lambda p: _clip("xla").apply({"params": p}, ids, method=clip_lib.CLIP.encode_text))(params)
    assert _max_diff(unmasked[1], want[1]) > 1e-2


def test_clip_vision_tower_splash_equals_xla(clip_case):
  params, _, _, pixels = clip_case
  encode = lambda m: lambda p: m.apply({"params": p}, pixels, method=clip_lib.CLIP.encode_image)
  want, got = (jax.jit(encode(_clip(a)))(params) for a in ("xla", "splash"))
  diff = _max_diff(got, want)
  print(f"clip vision: max |splash - xla| = {diff:.2e}")
  assert diff <= OUT_TOL
  loss = lambda m: lambda p: jnp.sum(jnp.sin(encode(m)(p)[0]))
  g_want, g_got = (jax.jit(jax.grad(loss(_clip(a))))(params) for a in ("xla", "splash"))
  print(f"clip vision: worst relative gradient difference {_check_grads(g_got, g_want):.2e}")


def test_prior_splash_equals_xla(prior_case):
  """Causal + text padding mask, including an all-False (null conditioning) row: x̂0 and parameter gradients."""
  params, args = prior_case
  run = lambda m: lambda p: m.apply({"params": p}, *args)
  want, got = (jax.jit(run(_prior(a)))(params) for a in ("xla", "splash"))
  assert np.isfinite(np.asarray(got)).all()
  diff = _max_diff(got, want)
  print(f"prior: max |splash - xla| = {diff:.2e}")
  assert diff <= OUT_TOL
  loss = lambda m: lambda p: jnp.mean(run(m)(p) ** 2)
  g_want, g_got = (jax.jit(jax.grad(loss(_prior(a))))(params) for a in ("xla", "splash"))
  print(f"prior: worst relative gradient difference {_check_grads(g_got, g_want):.2e}")
  unmasked = jax.jit(lambda p: _prior("xla").apply({"params": p}, *args[:4], jnp.ones_like(args[4])))(params)
  assert _max_diff(unmasked, want) > 1e-2                 # the mask matters in this example


# ---- what "auto" picks ----------------------------------------------------------------------------------------------
@pytest.fixture
def splash_calls(monkeypatch):
  """Records each `layers.splash_attention` call as (has a key mask, causal)."""
  calls = []
  splash = layers.splash_attention

  def recording(q, k, v, key_mask=None, **kw):
    calls.append((key_mask is not None, kw.get("causal", False)))
    return splash(q, k, v, key_mask, **kw)

  monkeypatch.setattr(layers, "splash_attention", recording)
  return calls


def test_auto_is_xla_here(clip_case, prior_case, splash_calls):
  """On CPU "auto" resolves to XLA for every CLIP and prior attention: the very same numbers as "xla"."""
  assert jax.default_backend() == "cpu"
  params, ids, mask, pixels = clip_case
  for method, inputs in ((clip_lib.CLIP.encode_text, (ids, mask)), (clip_lib.CLIP.encode_image, (pixels,))):
    auto, xla = (jax.jit(lambda p, m=_clip(a): m.apply({"params": p}, *inputs, method=method))(params)
                 for a in ("auto", "xla"))
    for g, w in zip(jax.tree.leaves(auto), jax.tree.leaves(xla)):
      np.testing.assert_array_equal(g, w)
  p_params, args = prior_case
  auto, xla = (jax.jit(lambda p, m=_prior(a): m.apply({"params": p}, *args))(p_params) for a in ("auto", "xla"))
  np.testing.assert_array_equal(auto, xla)
  assert splash_calls == []


def test_auto_on_tpu_routes_clip_and_the_prior_to_splash(clip_case, prior_case, splash_calls, monkeypatch):
  """"auto" on a TPU (as the compile-only preflight traces it): every text-tower layer calls the kernel with the
  causal mask (and the padding mask when given), every vision layer without masks, every prior layer with both;
  a head width the kernel does not take (the tiny prior's 12) stays on XLA."""
  monkeypatch.setattr(layers, "_platform", lambda: "tpu")
  monkeypatch.setattr(layers, "_splash_placeable", lambda: True)
  params, ids, mask, pixels = clip_case
  net = _clip("auto")
  for inputs, method, want in (((ids,), clip_lib.CLIP.encode_text, (False, True)),
                               ((ids, mask), clip_lib.CLIP.encode_text, (True, True)),
                               ((pixels,), clip_lib.CLIP.encode_image, (False, False))):
    splash_calls.clear()
    jax.eval_shape(lambda p: net.apply({"params": p}, *inputs, method=method), params)
    assert splash_calls == [want] * 2
  p_params, args = prior_case
  for scan in (False, True):
    model = _prior("auto", scan_layers=scan)
    abstract = jax.eval_shape(lambda m=model: builders.init_prior(m, jax.random.key(0)))
    splash_calls.clear()
    jax.eval_shape(lambda p: model.apply({"params": p}, *args), abstract)
    if scan:                                                 # nn.scan traces its body more than once
      assert splash_calls and set(splash_calls) == {(True, True)}
    else:
      assert splash_calls == [(True, True)] * 2
  splash_calls.clear()
  wide12 = _prior("auto", head_dim=12)
  jax.eval_shape(lambda p: wide12.apply({"params": p}, *args),
                 jax.eval_shape(lambda: builders.init_prior(wide12, jax.random.key(0))))
  assert splash_calls == []


# ---- the config field -----------------------------------------------------------------------------------------------
def test_config_attention_reaches_clip_and_the_prior():
  for stage in ("clip", "prior"):
    path = ROOT / "configs" / f"{stage}.py"
    for variant in runpy.run_path(str(path))["VARIANTS"]:
      assert config_lib.load_config(f"{path}:{variant}").model.attention == "auto", (stage, variant)
  clip_cfg = config_lib.load_config("configs/clip.py:tiny", ["model.attention=xla"])
  assert builders.clip(clip_cfg.model).config.attention == "xla"
  assert builders.clip_config(clip_cfg.model).attention == "xla"
  prior_cfg = config_lib.load_config("configs/prior.py:tiny", ["model.attention=splash"])
  assert builders.prior(prior_cfg.model).attention == "splash"


def test_configs_saved_before_the_field_load_as_auto():
  """Bundles written before `model.attention` existed (the embedded default bundle is one) complete to "auto";
  the converters' model blocks carry it."""
  from unclip_jax.convert import clip as convert_clip, prior as convert_prior

  bundle = ROOT / "unclip_jax" / "assets" / "default_bundle"
  for name in ("clip", "prior"):
    saved = json.loads((bundle / name / "config.json").read_text())
    assert "attention" not in saved["model"]
    assert config_lib.complete(saved).model.attention == "auto"
  saved = json.loads((bundle / "clip" / "config.json").read_text())
  assert builders.clip(config_lib.complete(saved).model).config.attention == "auto"
  saved = json.loads((bundle / "prior" / "config.json").read_text())
  assert builders.prior(config_lib.complete(saved).model).attention == "auto"
  cfg = clip_lib.CLIPConfig(text=TEXT, vision=VISION, projection_dim=16, attention="xla")
  assert builders.clip_config(convert_clip.model_block_from_config(cfg)) == cfg
  assert convert_clip.config_from_hf({"architectures": ["CLIPModel"]}).attention == "auto"
  block = convert_prior.model_config_from_diffusers({"num_attention_heads": 2, "attention_head_dim": 8})
  assert builders.prior(block).attention == "auto"
