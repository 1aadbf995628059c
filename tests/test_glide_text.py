"""GLIDE text encoder (models/glide_text.py) and its converter (ckpt/convert_glide_text.py).

No GLIDE package exists, so the properties of GLIDE's text transformer (docs/layouts.md, "GLIDE") are checked
against independent references: a hand-made
interleaved c_qkv, torch's scaled_dot_product_attention / layer_norm / exact GELU on the split projections, the
padding and last-position rules, the state-dict round trip and its errors, and a forward of our UNet on the
tiny decoder config with the GLIDE text pathway.
"""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from unclip_jax import config_lib  # noqa: E402
from unclip_jax.convert import glide as cgt  # noqa: E402
from unclip_jax.convert import unet as convert_unet  # noqa: E402
from unclip_jax.convert import torch_layout as tl  # noqa: E402
from unclip_jax.models import glide_text  # noqa: E402
from unclip_jax.models import unet as unet_lib  # noqa: E402
from unclip_jax import stages  # noqa: E402
from unclip_jax.stages import builders  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
END = 49                                  # tiny vocabulary of 50: end_token = n_vocab - 1


def tiny_cfg(*overrides):
  return config_lib.load_config(os.path.join(ROOT, "configs/decoder.py:tiny"),
                                ["model.text_encoder=glide", *overrides])


def random_params(abstract, seed, std=0.2):
  """Every leaf N(0, std²) (LayerNorm scales included), so no zero/one init hides a layout bug."""
  leaves, tree = jax.tree.flatten(abstract)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [(rng.standard_normal(x.shape) * std).astype(np.float32) for x in leaves])


@pytest.fixture(scope="module")
def enc():
  cfg = tiny_cfg()
  model = builders.glide_text(cfg.model, dtype="float32")
  params = random_params(builders.abstract(builders.init_glide_text, model), 0)
  tokens, mask = glide_text.padded_tokens_and_mask([[3, 7, 11], [], [5, 1, 2, 9, 4, 8, 6, 10, 12]], 8, END)
  fn = jax.jit(lambda p, t, m: model.apply({"params": p}, t, m))
  return dict(cfg=cfg, model=model, params=params, tokens=tokens, mask=mask, fn=fn)


def run(enc, params=None, tokens=None, mask=None):
  out = enc["fn"](enc["params"] if params is None else params, enc["tokens"] if tokens is None else tokens,
                  enc["mask"] if mask is None else mask)
  return tuple(np.asarray(o) for o in out)


# ---- tokens -----------------------------------------------------------------------------------------------------
def test_padded_tokens_and_mask():
  tokens, mask = glide_text.padded_tokens_and_mask([[4, 5], [], list(range(1, 12))], 8, END)
  assert tokens.dtype == np.int32 and mask.dtype == bool and tokens.shape == mask.shape == (3, 8)
  np.testing.assert_array_equal(tokens[0], [4, 5] + [END] * 6)
  np.testing.assert_array_equal(mask[0], [True] * 2 + [False] * 6)
  np.testing.assert_array_equal(tokens[1], [END] * 8)             # uncond: the empty list
  assert not mask[1].any()
  np.testing.assert_array_equal(tokens[2], range(1, 9))           # truncated to text_ctx
  assert mask[2].all()
  with pytest.raises(ValueError, match="list of token ids"):
    glide_text.padded_tokens_and_mask(["a cat"], 8, END)
  with pytest.raises(ValueError, match="list of token-id lists"):
    glide_text.padded_tokens_and_mask("a cat", 8, END)
  with pytest.raises(ValueError, match="non-negative ints"):
    glide_text.padded_tokens_and_mask([[1, -2]], 8, END)
  with pytest.raises(ValueError, match="text_ctx must be a positive int"):
    glide_text.padded_tokens_and_mask([[1]], 0, END)
  t, m = glide_text.drop_text(jnp.asarray(tokens), jnp.asarray(mask), jnp.array([True, False, False]), END)
  np.testing.assert_array_equal(t, np.stack([tokens[1], tokens[1], tokens[2]]))
  np.testing.assert_array_equal(m, np.stack([mask[1], mask[1], mask[2]]))


# ---- (a) interleaved c_qkv ----------------------------------------------------------------------------------------
def test_c_qkv_split_hand_made(enc):
  """Head h's rows of c_qkv are [q_h, k_h, v_h] (d rows each): the converter keeps them, split_qkv separates them."""
  heads, d, w = 4, 6, 24
  rng = np.random.default_rng(1)
  q, k, v = (rng.standard_normal((heads * d, w)).astype(np.float32) for _ in range(3))
  bq, bk, bv = (rng.standard_normal(heads * d).astype(np.float32) for _ in range(3))
  rows, brows = [], []
  for h in range(heads):
    s = slice(h * d, (h + 1) * d)
    rows += [q[s], k[s], v[s]]
    brows += [bq[s], bk[s], bv[s]]
  fused, fused_b = np.concatenate(rows), np.concatenate(brows)                          # (72, 24), (72,)
  (wq, wk, wv), (cq, ck, cv) = tl.split_heads(fused, fused_b, heads, d, 3)
  for got, want in ((wq, q), (wk, k), (wv, v), (cq, bq), (ck, bk), (cv, bv)):
    np.testing.assert_array_equal(got, want)
  state = cgt.state_dict_from_text_params(enc["params"], enc["cfg"].model)
  state["transformer.resblocks.1.attn.c_qkv.weight"], state["transformer.resblocks.1.attn.c_qkv.bias"] = fused, fused_b
  att = cgt.text_params_from_state_dict(state, enc["cfg"].model)["transformer"]["resblocks_1"]["attn"]["c_qkv"]
  np.testing.assert_array_equal(att["kernel"], fused.T)
  x = rng.standard_normal((2, 8, w)).astype(np.float32)
  sq, sk, sv = glide_text.split_qkv(jnp.asarray(x @ att["kernel"] + att["bias"]), heads)
  for got, wt, b in ((sq, q, bq), (sk, k, bk), (sv, v, bv)):
    np.testing.assert_allclose(np.asarray(got), (x @ wt.T + b).reshape(2, 8, heads, d), rtol=1e-5, atol=1e-5)
  # activations by hand: feature h·3d + j is q (j < d), k (d <= j < 2d) or v of head h
  feats = np.arange(3 * heads * d, dtype=np.float32)[None, None]
  sq, sk, sv = glide_text.split_qkv(jnp.asarray(feats), heads)
  np.testing.assert_array_equal(np.asarray(sq)[0, 0, 2], np.arange(2 * 3 * d, 2 * 3 * d + d))
  np.testing.assert_array_equal(np.asarray(sv)[0, 0, 3], np.arange(3 * 3 * d + 2 * d, 4 * 3 * d))
  with pytest.raises(ValueError, match="not divisible by 3·heads"):
    glide_text.split_qkv(jnp.zeros((1, 2, 70)), heads)


# ---- (b) attention and block vs torch ---------------------------------------------------------------------------
def _torch_attention(x, qkv_w, qkv_b, proj_w, proj_b, heads):
  """torch SDPA (default scale d^-1/2) on q, k, v split from the fused GLIDE weights with torch_layout.split_heads."""
  d = qkv_w.shape[0] // (3 * heads)
  (wq, wk, wv), (bq, bk, bv) = tl.split_heads(qkv_w, qkv_b, heads, d, 3)
  b, t, _ = x.shape
  xt = torch.from_numpy(x)
  proj = lambda w, bias: F.linear(xt, torch.from_numpy(w), torch.from_numpy(bias)).view(b, t, heads, d).transpose(1, 2)
  out = F.scaled_dot_product_attention(proj(wq, bq), proj(wk, bk), proj(wv, bv))      # [B, H, T, d], no mask
  return F.linear(out.transpose(1, 2).reshape(b, t, -1), torch.from_numpy(proj_w), torch.from_numpy(proj_b))


def test_attention_matches_torch_sdpa():
  """d^-1/4 on q and on k equals SDPA's d^-1/2; bidirectional and unmasked."""
  heads, w = 4, 24
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 8, w)).astype(np.float32)
  qkv_w, qkv_b, proj_w, proj_b = (rng.standard_normal(s).astype(np.float32) * 0.3
                                  for s in ((3 * w, w), (3 * w,), (w, w), (w,)))
  p = {"c_qkv": {"kernel": qkv_w.T, "bias": qkv_b}, "c_proj": {"kernel": proj_w.T, "bias": proj_b}}
  got = np.asarray(glide_text.GlideAttention(heads).apply({"params": p}, jnp.asarray(x)))
  with torch.no_grad():
    want = _torch_attention(x, qkv_w, qkv_b, proj_w, proj_b, heads).numpy()
  err = np.abs(got - want).max()
  print(f"GlideAttention vs torch SDPA: max|d|={err:.3g} (max|want|={np.abs(want).max():.3g})")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


def test_block_matches_torch_functional(enc):
  """One converted resblock = x + attn(layer_norm(x, eps 1e-5)), + c_proj(gelu_exact(c_fc(layer_norm(x))))."""
  heads, w = 4, 24
  state = cgt.state_dict_from_text_params(enc["params"], enc["cfg"].model)
  sd = {k[len("transformer.resblocks.0."):]: torch.from_numpy(v) for k, v in state.items()
        if k.startswith("transformer.resblocks.0.")}
  x = np.random.default_rng(3).standard_normal((2, 8, w)).astype(np.float32)
  with torch.no_grad():
    xt = torch.from_numpy(x)
    h = F.layer_norm(xt, (w,), sd["ln_1.weight"], sd["ln_1.bias"], eps=1e-5).numpy()
    xt = xt + _torch_attention(h, *(sd[f"attn.{n}"].numpy() for n in ("c_qkv.weight", "c_qkv.bias",
                                                                      "c_proj.weight", "c_proj.bias")), heads)
    h = F.layer_norm(xt, (w,), sd["ln_2.weight"], sd["ln_2.bias"], eps=1e-5)
    want = (xt + F.linear(F.gelu(F.linear(h, sd["mlp.c_fc.weight"], sd["mlp.c_fc.bias"])),
                          sd["mlp.c_proj.weight"], sd["mlp.c_proj.bias"])).numpy()
  block = enc["params"]["transformer"]["resblocks_0"]
  got = np.asarray(glide_text.ResidualAttentionBlock(heads).apply({"params": block}, jnp.asarray(x)))
  err = np.abs(got - want).max()
  print(f"ResidualAttentionBlock vs torch functional: max|d|={err:.3g} (max|want|={np.abs(want).max():.3g})")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


# ---- (c) padding, bidirectional -----------------------------------------------------------------------------------
def test_pads_get_padding_embedding_and_are_attended(enc):
  m, p, tokens, mask = enc["model"], enc["params"], enc["tokens"], enc["mask"]
  xf_in = np.asarray(m.apply({"params": p}, tokens, mask, method=glide_text.GlideTextEncoder.embed))
  tok, pos, pad = p["token_embedding"]["embedding"], p["positional_embedding"], p["padding_embedding"]
  np.testing.assert_allclose(xf_in[0, :3], tok[[3, 7, 11]] + pos[:3], rtol=1e-6)        # real tokens
  np.testing.assert_array_equal(xf_in[0, 3:], pad[3:])                                   # pads: per position
  np.testing.assert_array_equal(xf_in[1], pad)                                           # uncond: all pads
  base_proj, base_out = run(enc)
  # the pad token id itself is irrelevant: its embedding is replaced
  other = np.where(mask, tokens, 0).astype(np.int32)
  proj, out = run(enc, tokens=other)
  np.testing.assert_array_equal(out, base_out)
  np.testing.assert_array_equal(proj, base_proj)
  # pads are attended (no mask) and attention is bidirectional: a later pad position changes earlier outputs
  bumped = {**p, "padding_embedding": np.asarray(pad).copy()}
  bumped["padding_embedding"][-1] += np.random.default_rng(9).standard_normal(24)   # not a constant: LN removes it
  proj, out = run(enc, params=bumped)
  assert np.abs(out[0, 0] - base_out[0, 0]).max() > 1e-3            # position 0 (a real token) sees the last pad
  np.testing.assert_array_equal(out[2], base_out[2])                 # row 2 has no pads: unchanged
  # a later real token changes an earlier real token's output
  later = tokens.copy()
  later[0, 2] = 20
  assert np.abs(run(enc, tokens=later)[1][0, 0] - base_out[0, 0]).max() > 1e-3


def test_without_padding_the_mask_is_unused(enc):
  cfg = tiny_cfg("model.xf_padding=False", "model.xf_final_ln=False")
  model = builders.glide_text(cfg.model)
  params = random_params(builders.abstract(builders.init_glide_text, model), 4)
  assert "padding_embedding" not in params and "final_ln" not in params
  a = model.apply({"params": params}, enc["tokens"], enc["mask"])
  b = model.apply({"params": params}, enc["tokens"], None)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(ValueError, match="mask .* is required with xf_padding"):
    enc["model"].apply({"params": enc["params"]}, enc["tokens"], None)


# ---- (d) xf_proj from the last position ----------------------------------------------------------------------------
def test_xf_proj_is_the_last_position(enc):
  proj, out = run(enc)
  kp = enc["params"]["transformer_proj"]
  np.testing.assert_allclose(proj, out[:, -1] @ kp["kernel"] + kp["bias"], rtol=1e-5, atol=1e-5)
  assert np.abs(proj - (out[:, 0] @ kp["kernel"] + kp["bias"])).max() > 1e-2
  # xf_out is final_ln's output: zero mean, unit variance (before its affine) per position
  ln = enc["params"]["final_ln"]
  normed = (out - ln["bias"]) / ln["scale"]
  np.testing.assert_allclose(normed.mean(-1), 0.0, atol=1e-4)
  cond = glide_text.conditioning(enc["model"], enc["params"], enc["tokens"], enc["mask"])
  assert set(cond) == {"encoder_hidden_states", "class_labels", "attention_mask"} and cond["attention_mask"] is None
  np.testing.assert_allclose(np.asarray(cond["class_labels"]), proj, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(cond["encoder_hidden_states"]), out, rtol=1e-6, atol=1e-6)


def test_bfloat16_compute_float32_params_and_outputs(enc):
  model = builders.glide_text(enc["cfg"].model, dtype="bfloat16")
  proj, out = model.apply({"params": enc["params"]}, enc["tokens"], enc["mask"])
  assert proj.dtype == out.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(builders.abstract(builders.init_glide_text, model)))
  want_proj, want_out = run(enc)
  assert np.abs(np.asarray(out) - want_out).max() / np.abs(want_out).max() < 5e-2
  assert np.abs(np.asarray(proj) - want_proj).max() / np.abs(want_proj).max() < 5e-2


def test_kernels_have_logical_axes(enc):
  boxed = jax.eval_shape(lambda r: enc["model"].init(r, *builders.glide_dummy_inputs(enc["model"])),
                         jax.random.key(0))["params"]
  is_spec = lambda s: isinstance(s, jax.sharding.PartitionSpec)
  specs = {tuple(k.key for k in path): tuple(spec) for path, spec in
           jax.tree_util.tree_flatten_with_path(nn.get_partition_spec(boxed), is_leaf=is_spec)[0]}
  assert specs[("transformer", "resblocks_0", "attn", "c_qkv", "kernel")] == ("embed", "heads")
  assert specs[("transformer", "resblocks_1", "attn", "c_proj", "kernel")] == ("heads", "embed")
  assert specs[("transformer", "resblocks_1", "mlp", "c_fc", "kernel")] == ("embed", "mlp")
  assert specs[("token_embedding", "embedding")] == ("vocab", "embed")
  assert specs[("padding_embedding",)] == ("length", "embed")
  assert specs[("transformer_proj", "kernel")] == (None, "embed")


def test_bad_inputs_and_configs_raise(enc):
  m, p = enc["model"], enc["params"]
  with pytest.raises(ValueError, match=r"tokens must be \[B, text_ctx=8\]"):
    m.apply({"params": p}, np.zeros((1, 7), np.int32), np.ones((1, 7), bool))
  with pytest.raises(ValueError, match="integer ids"):
    m.apply({"params": p}, np.zeros((1, 8), np.float32), np.ones((1, 8), bool))
  with pytest.raises(ValueError, match="mask must have the tokens' shape"):
    m.apply({"params": p}, enc["tokens"], enc["mask"][:, :4])
  with pytest.raises(ValueError, match="cross_attention_dim=32 must equal model.xf_width=24"):
    builders.glide_text(tiny_cfg("model.cross_attention_dim=32").model)
  with pytest.raises(ValueError, match="xf_width=24 is not divisible by xf_heads=5"):
    builders.abstract(builders.init_glide_text, builders.glide_text(tiny_cfg("model.xf_heads=5").model))
  with pytest.raises(ValueError, match="unknown model.text_encoder 'clip'"):
    stages.get("decoder").build(tiny_cfg("model.text_encoder=clip"))


# ---- (e) state dicts ------------------------------------------------------------------------------------------------
def test_state_dict_round_trip_and_names(enc):
  cfg = enc["cfg"].model
  state = cgt.state_dict_from_text_params(enc["params"], cfg)
  per_block = ["ln_1.weight", "ln_1.bias", "attn.c_qkv.weight", "attn.c_qkv.bias", "attn.c_proj.weight",
               "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
               "mlp.c_proj.weight", "mlp.c_proj.bias"]
  want = {"token_embedding.weight": (50, 24), "positional_embedding": (8, 24), "padding_embedding": (8, 24),
          "final_ln.weight": (24,), "final_ln.bias": (24,), "transformer_proj.weight": (64, 24),
          "transformer_proj.bias": (64,)}
  for i in range(2):
    want.update({f"transformer.resblocks.{i}.{k}": None for k in per_block})
  assert set(state) == set(want)
  assert {k: v.shape for k, v in state.items() if want[k]} == {k: s for k, s in want.items() if s}
  assert state["transformer.resblocks.0.attn.c_qkv.weight"].shape == (72, 24)
  assert state["transformer.resblocks.1.mlp.c_fc.weight"].shape == (96, 24)
  back = cgt.text_params_from_state_dict(state, cfg)
  assert jax.tree.structure(back) == jax.tree.structure(enc["params"])
  jax.tree.map(np.testing.assert_array_equal, back, enc["params"])
  # torch tensors (any float dtype) are accepted too
  back = cgt.text_params_from_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, cfg)
  jax.tree.map(np.testing.assert_array_equal, back, enc["params"])
  inferred = cgt.config_from_state_dict(state, heads=4)
  assert (inferred.text_ctx, inferred.xf_width, inferred.xf_layers, inferred.xf_heads, inferred.n_vocab,
          inferred.xf_final_ln, inferred.xf_padding, inferred.time_embed_dim) == (8, 24, 2, 4, 50, True, True, 64)
  assert cgt.text_encoder(inferred).time_embed_dim == 64
  with pytest.raises(ValueError, match="multiple of 64: pass heads="):
    cgt.config_from_state_dict(state)


def test_bad_state_dicts_name_the_key(enc):
  cfg = enc["cfg"].model
  state = cgt.state_dict_from_text_params(enc["params"], cfg)
  missing = dict(state)
  del missing["transformer.resblocks.1.ln_2.bias"]
  with pytest.raises(ValueError, match=r"missing keys: \['transformer.resblocks.1.ln_2.bias'\]"):
    cgt.text_params_from_state_dict(missing, cfg)
  with pytest.raises(ValueError, match="unexpected key 'unemb.weight'"):
    cgt.text_params_from_state_dict({**state, "unemb.weight": np.zeros((50, 24), np.float32)}, cfg)
  with pytest.raises(ValueError, match="unexpected key 'transformer.resblocks.2.ln_1.weight'"):
    cgt.text_params_from_state_dict({**state, "transformer.resblocks.2.ln_1.weight": np.zeros(24, np.float32)}, cfg)
  bad = {**state, "transformer.resblocks.0.attn.c_qkv.weight": np.zeros((72, 25), np.float32)}
  with pytest.raises(ValueError, match=r"'transformer.resblocks.0.attn.c_qkv.weight': shape \(72, 25\) .*"
                                       r"expected \(72, 24\)"):
    cgt.text_params_from_state_dict(bad, cfg)
  bad = {**state, "padding_embedding": np.zeros((16, 24), np.float32)}
  with pytest.raises(ValueError, match=r"'padding_embedding': shape \(16, 24\)"):
    cgt.text_params_from_state_dict(bad, cfg)
  with pytest.raises(ValueError, match="'token_embedding.weight': expected a floating-point tensor"):
    cgt.text_params_from_state_dict({**state, "token_embedding.weight": np.zeros((50, 24), np.int64)}, cfg)
  bad_tree = tl.flatten(enc["params"])
  del bad_tree[("final_ln", "scale")]
  with pytest.raises(ValueError, match=r"missing \['final_ln/scale'\]"):
    cgt.state_dict_from_text_params(tl.nest(bad_tree), cfg)


def test_whole_glide_state_dict_splits_into_unet_and_text(enc):
  """The text converter takes exactly the keys convert_unet.glide_to_params leaves over."""
  cfg = enc["cfg"].model
  unet_params = random_params(builders.abstract(builders.init_unet, builders.unet(cfg)), 5)
  full = cgt.params_to_glide(unet_params, enc["params"], cfg)
  assert "input_blocks.4.1.encoder_kv.weight" in full and "transformer.resblocks.0.attn.c_qkv.weight" in full
  _, rest = convert_unet.glide_to_params(full, cfg)
  assert set(rest) == set(cgt.state_dict_from_text_params(enc["params"], cfg))
  u, t = cgt.glide_to_params(full, cfg)
  jax.tree.map(np.testing.assert_array_equal, u, unet_params)
  jax.tree.map(np.testing.assert_array_equal, t, enc["params"])
  inferred = cgt.config_from_state_dict(full, heads=4)
  assert (inferred.xf_layers, inferred.time_embed_dim) == (2, 64)


# ---- (f) UNet forward with the GLIDE pathway -----------------------------------------------------------------------
def test_unet_forward_with_glide_conditioning(enc):
  """configs/decoder.py:tiny + text_encoder=glide: conditioning(...) feeds the UNet ([uncond; cond] rows)."""
  cfg = enc["cfg"]
  assert cfg.model.text_encoder == "glide"
  unet = builders.unet(cfg.model, dtype="float32")
  unet_params = random_params(builders.abstract(builders.init_unet, unet), 6, std=0.1)
  tokens, mask = glide_text.padded_tokens_and_mask([[], [3, 4, 5]], cfg.model.text_ctx, enc["model"].end_token)
  x = jnp.asarray(np.random.default_rng(7).standard_normal((1, 16, 16, 3)).astype(np.float32))

  @jax.jit
  def forward(up, tp, x, t, tokens, mask):
    cond = glide_text.conditioning(enc["model"], tp, tokens, mask)
    return unet.apply({"params": up}, jnp.concatenate([x, x]), t, **cond)

  out = np.asarray(forward(unet_params, enc["params"], x, jnp.array([5, 5]), tokens, mask))
  assert out.shape == (2, 16, 16, 6) and np.isfinite(out).all()
  assert np.abs(out[0] - out[1]).max() > 1e-3                      # the caption changes the prediction
