"""UNet parity with diffusers (UNet2DConditionModel decoder, UNet2DModel super-res), import/export, sizes, input
checks, and the original Karlo/GLIDE (guided-diffusion) layout."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from unclip_jax import config_lib  # noqa: E402
from unclip_jax.convert import unet as convert_unet  # noqa: E402
from unclip_jax.models import unet as unet_lib  # noqa: E402
from unclip_jax.stages import builders, common  # noqa: E402

from helpers import DECODER_KW, REL_TOL, SR_KW, compare, nchw, nhwc, randomize  # noqa: E402,F401

ROOT = os.path.join(os.path.dirname(__file__), "..")
B, T = 2, 20


def decoder_inputs(seed=0):
  rng = np.random.default_rng(seed)
  mask = np.ones((B, T), bool)
  mask[1, 4 + 3:] = False                 # 4 image tokens + 3 text tokens kept, the rest padding
  return dict(x=rng.standard_normal((B, 16, 16, 3)).astype(np.float32), t=np.array([999, 10]),
              ehs=rng.standard_normal((B, T, 24)).astype(np.float32),
              class_labels=rng.standard_normal((B, 64)).astype(np.float32), mask=mask)


def jax_apply(model_cfg, params, x, t, **kw):
  model = builders.unet(model_cfg, dtype="float32")
  fn = jax.jit(lambda p, x, t, kw: model.apply({"params": p}, x, t, **kw))
  return np.asarray(fn(params, jnp.asarray(x), jnp.asarray(t, jnp.int32), {k: jnp.asarray(v) for k, v in kw.items()}))


def torch_decoder(model, inp):
  with torch.no_grad():
    out = model(nchw(inp["x"]), torch.from_numpy(inp["t"]), encoder_hidden_states=torch.from_numpy(inp["ehs"]),
                class_labels=torch.from_numpy(inp["class_labels"]),
                attention_mask=torch.from_numpy(inp["mask"])).sample
  return nhwc(out)


# ---- decoder --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
  torch.manual_seed(0)
  model = randomize(diffusers.UNet2DConditionModel(**DECODER_KW), 1)
  d = tmp_path_factory.mktemp("decoder")
  model.save_pretrained(d)
  inp = decoder_inputs()
  cfg, params = convert_unet.load_diffusers_unet(d)
  got = jax_apply(cfg, params, inp["x"], inp["t"], encoder_hidden_states=inp["ehs"],
                  class_labels=inp["class_labels"], attention_mask=inp["mask"])
  return dict(torch=model, dir=d, cfg=cfg, params=params, inp=inp, want=torch_decoder(model, inp), got=got)


def test_decoder_config_from_diffusers(decoder):
  cfg = decoder["cfg"]
  assert cfg.block_out_channels == (16, 32, 48) and cfg.layers_per_block == 2
  assert cfg.attention_levels == (False, True, True) and cfg.mid_block_attention
  assert (cfg.head_dim, cfg.cross_attention_dim, cfg.class_embed_type) == (8, 24, "identity")
  assert (cfg.time_scale_shift, cfg.in_channels, cfg.out_channels, cfg.conditioning) == ("scale_shift", 3, 6, "none")


def test_decoder_matches_diffusers(decoder):
  """Every Karlo block type, conv shortcuts, 4/6-head attention, padded text mask; fp32, rel 1e-4."""
  compare(decoder["got"], decoder["want"], "decoder UNet2DConditionModel")


def test_decoder_mask_matters(decoder):
  """The padded tokens must be masked: an all-True mask changes the padded sample only."""
  inp = dict(decoder["inp"])
  got = jax_apply(decoder["cfg"], decoder["params"], inp["x"], inp["t"], encoder_hidden_states=inp["ehs"],
                  class_labels=inp["class_labels"], attention_mask=np.ones_like(inp["mask"]))
  np.testing.assert_allclose(got[0], decoder["got"][0], atol=1e-6)
  assert np.abs(got[1] - decoder["got"][1]).max() > 1e-3


def test_decoder_export_loads_in_diffusers(decoder, tmp_path):
  convert_unet.save_diffusers_unet(tmp_path, decoder["params"], decoder["cfg"])
  back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path).eval()
  np.testing.assert_allclose(torch_decoder(back, decoder["inp"]), decoder["want"], rtol=0, atol=1e-6)
  sd, orig = back.state_dict(), decoder["torch"].state_dict()
  assert sorted(sd) == sorted(orig)
  for k in sd:
    assert torch.equal(sd[k], orig[k]), k


def _call_kw(decoder):
  inp = decoder["inp"]
  kw = dict(encoder_hidden_states=jnp.asarray(inp["ehs"]), class_labels=jnp.asarray(inp["class_labels"]),
            attention_mask=jnp.asarray(inp["mask"]))
  return jnp.asarray(inp["x"]), jnp.asarray(inp["t"], jnp.int32), kw


def test_decoder_bf16(decoder):
  """bf16 compute with float32 params and output stays close to the fp32 result."""
  x, t, kw = _call_kw(decoder)
  bf16 = builders.unet(decoder["cfg"], dtype="bfloat16")
  out = jax.jit(lambda p: bf16.apply({"params": p}, x, t, **kw))(decoder["params"])
  assert out.dtype == jnp.float32
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(decoder["params"]))
  rel = float(jnp.abs(out - decoder["got"]).max() / np.abs(decoder["got"]).max())
  print(f"bf16 vs fp32 decoder: rel {rel:.3g}")
  assert rel < 0.1


@pytest.mark.slow
def test_decoder_remat_same_gradients(decoder):
  x, t, kw = _call_kw(decoder)
  loss = lambda m: jax.jit(jax.value_and_grad(lambda p: jnp.mean(m.apply({"params": p}, x, t, **kw) ** 2)))
  l1, g1 = loss(builders.unet(decoder["cfg"], dtype="float32", remat="dots_saveable"))(decoder["params"])
  l2, g2 = loss(builders.unet(decoder["cfg"], dtype="float32"))(decoder["params"])
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)


@pytest.mark.slow
def test_decoder_dropout_flag(decoder):
  """`deterministic=False` draws from the 'dropout' rng in every resnet; True reproduces the eval output."""
  x, t, kw = _call_kw(decoder)
  model = builders.unet(dict(decoder["cfg"], dropout=0.3), dtype="float32")
  f = jax.jit(lambda p, r, det: model.apply({"params": p}, x, t, deterministic=det, rngs={"dropout": r}, **kw),
              static_argnums=2)
  a, b = f(decoder["params"], jax.random.key(0), False), f(decoder["params"], jax.random.key(1), False)
  assert float(jnp.abs(a - b).max()) > 1e-3
  np.testing.assert_allclose(f(decoder["params"], jax.random.key(0), True), decoder["got"], rtol=1e-5, atol=1e-5)


def test_remat_keeps_param_tree():
  cfg = config_lib.load_config(os.path.join(ROOT, "configs/decoder.py:tiny")).model
  plain = builders.abstract(builders.init_unet, builders.unet(cfg))
  for policy in ("full", "dots_saveable"):
    assert jax.tree.structure(builders.abstract(builders.init_unet, builders.unet(cfg, remat=policy))) == \
        jax.tree.structure(plain)
  with pytest.raises(ValueError, match="unknown remat policy"):
    builders.abstract(builders.init_unet, builders.unet(cfg, remat="sometimes"))


def test_resnet_dropout_uses_rng():
  block = lambda det: unet_lib.ResnetBlock2D(16, groups=8, dropout=0.5, deterministic=det)
  x, temb = jnp.ones((1, 4, 4, 8)), jnp.ones((1, 12))
  params = block(True).init(jax.random.key(0), x, temb)
  a = block(False).apply(params, x, temb, rngs={"dropout": jax.random.key(1)})
  b = block(False).apply(params, x, temb, rngs={"dropout": jax.random.key(2)})
  assert float(jnp.abs(a - b).max()) > 1e-4
  np.testing.assert_array_equal(block(True).apply(params, x, temb), block(True).apply(params, x, temb))


# ---- super-res ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def super_res(tmp_path_factory):
  torch.manual_seed(0)
  model = randomize(diffusers.UNet2DModel(**SR_KW), 2)
  d = tmp_path_factory.mktemp("sr")
  model.save_pretrained(d)
  rng = np.random.default_rng(1)
  x_t = rng.standard_normal((B, 32, 32, 3)).astype(np.float32)
  low = np.tanh(rng.standard_normal((B, 16, 16, 3))).astype(np.float32)
  with torch.no_grad():        # the pipeline's upsampling (bicubic, antialiased)
    up = torch.nn.functional.interpolate(nchw(low), size=[32, 32], mode="bicubic", align_corners=False,
                                         antialias=True)
    want = nhwc(model(torch.cat([nchw(x_t), up], 1), torch.tensor([500, 3])).sample)
  cfg, params = convert_unet.load_diffusers_unet(d)
  x = common.model_input(jnp.asarray(x_t), conditioning=cfg.conditioning, low_res=jnp.asarray(low))
  return dict(torch=model, cfg=cfg, params=params, x=np.asarray(x), up=nhwc(up), t=np.array([500, 3]), want=want,
              got=jax_apply(cfg, params, x, np.array([500, 3])))


def test_super_res_config_from_diffusers(super_res):
  cfg = super_res["cfg"]
  assert cfg.conditioning == "low_res" and cfg.in_channels == 6 and cfg.out_channels == 3
  assert not any(cfg.attention_levels) and not cfg.mid_block_attention and cfg.class_embed_type is None
  assert cfg.time_scale_shift == "default"


def test_super_res_bicubic_condition_matches_torch(super_res):
  np.testing.assert_allclose(super_res["x"][..., 3:], super_res["up"], atol=1e-5)


def test_super_res_matches_diffusers(super_res):
  compare(super_res["got"], super_res["want"], "super-res UNet2DModel")


def test_super_res_export_loads_in_diffusers(super_res, tmp_path):
  convert_unet.save_diffusers_unet(tmp_path, super_res["params"], super_res["cfg"])
  assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "UNet2DModel"
  back = diffusers.UNet2DModel.from_pretrained(tmp_path).eval()
  with torch.no_grad():
    out = nhwc(back(nchw(super_res["x"]), torch.from_numpy(super_res["t"])).sample)
  with torch.no_grad():
    ref = nhwc(super_res["torch"](nchw(super_res["x"]), torch.from_numpy(super_res["t"])).sample)
  np.testing.assert_allclose(out, ref, rtol=0, atol=0)


# ---- sizes ----------------------------------------------------------------------------------------------------
def _meta_count(cls, config):
  with torch.device("meta"):
    model = cls.from_config(config)
  return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("spec, cls, millions", [("configs/decoder.py:karlo", "UNet2DConditionModel", 885.4),
                                                 ("configs/upsampler.py:karlo_64_256", "UNet2DModel", 691.6)])
def test_karlo_param_counts(spec, cls, millions):
  """eval_shape only (no allocation); equals diffusers built on the meta device from our exported config."""
  cfg = config_lib.load_config(os.path.join(ROOT, spec))
  n = builders.unet_param_count(builders.unet(cfg.model))
  print(f"{spec}: {n} params")
  assert round(n / 1e6, 1) == millions
  dcfg = convert_unet.diffusers_config_from_unet(cfg.model)
  assert dcfg["_class_name"] == cls
  assert _meta_count(getattr(diffusers, cls), dcfg) == n


def test_all_config_variants_build():
  for spec in ("configs/decoder.py:tiny", "configs/decoder.py:glide", "configs/upsampler.py:tiny",
               "configs/upsampler.py:paper_256_1024"):
    cfg = config_lib.load_config(os.path.join(ROOT, spec))
    assert builders.unet_param_count(builders.unet(cfg.model)) > 0


# ---- input checks ---------------------------------------------------------------------------------------------
def test_bad_inputs_raise(decoder):
  model, params, inp = builders.unet(decoder["cfg"]), decoder["params"], decoder["inp"]
  kw = dict(encoder_hidden_states=inp["ehs"], class_labels=inp["class_labels"], attention_mask=inp["mask"])
  run = lambda x, **k: jax.eval_shape(lambda p: model.apply({"params": p}, x, inp["t"], **{**kw, **k}), params)
  with pytest.raises(ValueError, match="divisible by 2"):
    run(np.zeros((B, 18, 16, 3), np.float32))
  with pytest.raises(ValueError, match="in_channels=3"):
    run(np.zeros((B, 16, 16, 4), np.float32))
  with pytest.raises(ValueError, match="class_labels .* required"):
    run(inp["x"], class_labels=None)
  with pytest.raises(ValueError, match="class_labels must be"):
    run(inp["x"], class_labels=np.zeros((B, 65), np.float32))
  with pytest.raises(ValueError, match="encoder_hidden_states .* required"):
    run(inp["x"], encoder_hidden_states=None)
  with pytest.raises(ValueError, match="encoder_hidden_states must be"):
    run(inp["x"], encoder_hidden_states=np.zeros((B, T, 25), np.float32))
  with pytest.raises(ValueError, match="attention_mask must be"):
    run(inp["x"], attention_mask=np.ones((B, T + 1), bool))


def test_model_input_layouts():
  x = jnp.ones((1, 8, 8, 3))
  img, mask = jnp.full((1, 8, 8, 3), 2.0), jnp.zeros((1, 8, 8)).at[:, :4].set(1.0)
  out = common.model_input(x, conditioning="inpaint", inpaint_image=img, inpaint_mask=mask)
  assert out.shape == (1, 8, 8, 7) == (1, 8, 8, builders.input_channels(3, "inpaint"))
  np.testing.assert_array_equal(out[..., 3:6], img * mask[..., None])
  np.testing.assert_array_equal(out[..., 6], mask)
  out = common.model_input(x, conditioning="inpaint_low_res", low_res=jnp.ones((1, 4, 4, 3)))
  assert out.shape == (1, 8, 8, 10) and float(jnp.abs(out[..., 3:7]).max()) == 0.0
  with pytest.raises(ValueError, match="needs low_res"):
    common.model_input(x, conditioning="low_res")
  with pytest.raises(ValueError, match="unknown conditioning"):
    common.model_input(x, conditioning="depth")


# ---- converter errors -----------------------------------------------------------------------------------------
def test_converter_rejects_bad_state_dicts(decoder):
  cfg = decoder["cfg"]
  state = convert_unet.unet_params_to_diffusers(decoder["params"], cfg)
  missing = dict(state)
  del missing["down_blocks.1.attentions.0.add_k_proj.weight"]
  with pytest.raises(ValueError, match=r"missing keys: \['down_blocks.1.attentions.0.add_k_proj.weight'\]"):
    convert_unet.diffusers_to_unet_params(missing, cfg)
  with pytest.raises(ValueError, match="unexpected key 'down_blocks.0.attentions.0.to_q.weight'"):
    convert_unet.diffusers_to_unet_params({**state, "down_blocks.0.attentions.0.to_q.weight": np.zeros((16, 16))},
                                          cfg)
  bad = {**state, "up_blocks.0.resnets.1.conv1.weight": np.zeros((48, 95, 3, 3), np.float32)}
  with pytest.raises(ValueError, match=r"'up_blocks.0.resnets.1.conv1.weight': shape \(48, 95, 3, 3\)"):
    convert_unet.diffusers_to_unet_params(bad, cfg)


def test_converter_file_errors(decoder, tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "config.json")):
    convert_unet.load_diffusers_unet(tmp_path)
  (tmp_path / "config.json").write_text((decoder["dir"] / "config.json").read_text())
  with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
    convert_unet.load_diffusers_unet(tmp_path)
  (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
  with pytest.raises(ValueError, match="cannot read safetensors file .*diffusion_pytorch_model.safetensors"):
    convert_unet.load_diffusers_unet(tmp_path)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="cannot read diffusers config .*config.json"):
    convert_unet.load_diffusers_unet(tmp_path)


def test_converter_rejects_unsupported_configs():
  base = {"_class_name": "UNet2DConditionModel", **DECODER_KW}
  with pytest.raises(ValueError, match="down block type 'CrossAttnDownBlock2D'"):
    convert_unet.unet_config_from_diffusers({**base, "down_block_types": ["CrossAttnDownBlock2D"] * 3})
  with pytest.raises(ValueError, match="must mirror"):
    convert_unet.unet_config_from_diffusers({**base, "up_block_types": ["SimpleCrossAttnUpBlock2D"] * 3})
  with pytest.raises(ValueError, match="class_embed_type 'timestep'"):
    convert_unet.unet_config_from_diffusers({**base, "class_embed_type": "timestep"})
  with pytest.raises(ValueError, match="not a 'UNet2DConditionModel'"):
    convert_unet.unet_config_from_diffusers({"_class_name": "PriorTransformer"})


# ---- original Karlo / GLIDE layout ----------------------------------------------------------------------------
# Diffusers twin of the tiny Karlo PLMImUNet / GLIDE Text2ImUNet instances: 2 levels, L=2, attention at level 1.
TWIN = dict(conditioning="none", in_channels=3, out_channels=6, block_out_channels=(32, 64), layers_per_block=2,
            attention_levels=(False, True), mid_block_attention=True, head_dim=16, cross_attention_dim=24,
            class_embed_type="identity", time_scale_shift="scale_shift", norm_num_groups=32,
            **convert_unet.GUIDED_UNET_FIXED)
SR_TWIN = dict(in_channels=6, out_channels=3, block_out_channels=(32, 64), layers_per_block=2,
               attention_levels=(False, False), mid_block_attention=False, head_dim=8, cross_attention_dim=None,
               class_embed_type=None, time_scale_shift="default", conditioning="low_res", norm_num_groups=32,
               **convert_unet.GUIDED_UNET_FIXED)
TP_TWIN = dict(clip_embeddings_dim=8, time_embed_dim=128, cross_attention_dim=24, clip_extra_context_tokens=4)


def _random_params(model_fn, seed):
  abstract = model_fn()
  leaves, tree = jax.tree.flatten(abstract)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [rng.standard_normal(x.shape).astype(np.float32) for x in leaves])


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_karlo_decoder_layout_round_trip():
  from unclip_jax.models import text_proj as tp_lib

  params = _random_params(lambda: builders.abstract(builders.init_unet, builders.unet(TWIN)), 0)
  tp = _random_params(lambda: builders.abstract(builders.init_text_proj, convert_unet.text_proj_from_block(TP_TWIN)), 1)
  state = convert_unet.params_to_karlo_decoder(params, tp, TWIN, TP_TWIN)
  # Index arithmetic (docs/layouts.md, "Karlo decoder") for N=2, L=2, attention at level 1.
  for key in ("model.input_blocks.0.0.weight", "model.input_blocks.3.0.in_layers.0.weight",
              "model.input_blocks.5.1.qkv.weight", "model.middle_block.1.encoder_kv.weight",
              "model.middle_block.2.out_layers.3.weight", "model.output_blocks.2.2.in_layers.2.weight",
              "model.output_blocks.5.0.skip_connection.weight", "model.out.2.weight", "model.cf_param",
              "model.clip_tok_proj.weight", "model.text_seq_proj.1.bias"):
    assert key in state, key
  assert not any(k.startswith("model.output_blocks.6") or k.startswith("model.input_blocks.6") for k in state)
  assert "model.output_blocks.2.1.qkv.weight" in state and "model.output_blocks.5.1.weight" not in state
  assert state["model.input_blocks.4.1.qkv.weight"].shape == (3 * 64, 64, 1)
  assert state["model.input_blocks.4.1.encoder_kv.weight"].shape == (2 * 64, 24, 1)
  back, tp_back = convert_unet.karlo_decoder_to_params(state, TWIN, TP_TWIN)
  _assert_trees_equal(back, params)
  _assert_trees_equal(tp_back, tp)
  with pytest.raises(ValueError, match="unexpected keys in the Karlo decoder state dict: \\['model.extra'\\]"):
    convert_unet.karlo_decoder_to_params({**state, "model.extra": np.zeros(1)}, TWIN, TP_TWIN)
  del state["model.input_blocks.4.1.qkv.bias"]
  with pytest.raises(ValueError, match="missing key 'input_blocks.4.1.qkv.bias'"):
    convert_unet.karlo_decoder_to_params(state, TWIN, TP_TWIN)


def test_karlo_sr_and_glide_layout_round_trip():
  make = lambda cfg, seed: _random_params(lambda: builders.abstract(builders.init_unet, builders.unet(cfg)), seed)
  first, last = make(SR_TWIN, 0), make(SR_TWIN, 1)
  state = convert_unet.params_to_karlo_sr(first, last, SR_TWIN)
  assert "model.model_first_steps.output_blocks.2.1.in_layers.0.weight" in state     # upsampler: .1 w/o attention
  assert "model.model_last_step.middle_block.1.emb_layers.1.weight" in state         # mid: resnets only
  back = convert_unet.karlo_sr_to_params(state, SR_TWIN)
  _assert_trees_equal(back["super_res_first"], first)
  _assert_trees_equal(back["super_res_last"], last)
  glide = make(dict(TWIN, cross_attention_dim=32), 2)
  gstate = convert_unet.params_to_glide(glide, dict(TWIN, cross_attention_dim=32))
  gstate["token_embedding.weight"] = np.zeros((50, 32), np.float32)
  back, rest = convert_unet.glide_to_params(gstate, dict(TWIN, cross_attention_dim=32))
  _assert_trees_equal(back, glide)
  assert list(rest) == ["token_embedding.weight"]


def test_interleaved_heads_hand_made():
  """The per-head split (docs/layouts.md, "Fused projections") by hand: fused rows are [q_h0, k_h0, v_h0, q_h1,
  ...] and [k_h0, v_h0, k_h1, ...], head_dim rows each."""
  heads, d, c, dc = 4, 16, 64, 24
  rng = np.random.default_rng(3)
  q, k, v = (rng.standard_normal((heads * d, c)).astype(np.float32) for _ in range(3))
  ek, ev = (rng.standard_normal((heads * d, dc)).astype(np.float32) for _ in range(2))
  qkv, ekv = [], []
  for h in range(heads):
    rows = slice(h * d, (h + 1) * d)
    qkv += [q[rows], k[rows], v[rows]]
    ekv += [ek[rows], ev[rows]]
  qkv, ekv = np.concatenate(qkv), np.concatenate(ekv)
  params = _random_params(lambda: builders.abstract(builders.init_unet, builders.unet(TWIN)), 0)
  state = convert_unet.params_to_glide(params, TWIN)
  pre = "input_blocks.4.1"
  state[f"{pre}.qkv.weight"], state[f"{pre}.qkv.bias"] = qkv[:, :, None], qkv[:, 0]
  state[f"{pre}.encoder_kv.weight"], state[f"{pre}.encoder_kv.bias"] = ekv[:, :, None], ekv[:, 1]
  out, _ = convert_unet.glide_to_params(state, TWIN)
  att = out["down_blocks_1"]["attentions_0"]
  for name, w, b in (("to_q", q, q[:, 0]), ("to_k", k, k[:, 0]), ("to_v", v, v[:, 0]),
                     ("add_k_proj", ek, ek[:, 1]), ("add_v_proj", ev, ev[:, 1])):
    np.testing.assert_array_equal(att[name]["kernel"], w.T, err_msg=name)
    np.testing.assert_array_equal(att[name]["bias"], b, err_msg=name)


def test_guided_attention_semantics_numpy():
  """Our attention with converted weights equals a numpy transcription of GLIDE's AttentionBlock/QKVAttention
  (fused qkv reshaped to (B·H, 3d, L) and split; encoder keys concatenated FIRST; residual)."""
  heads, d, c, dc, hw, t = 2, 16, 32, 24, 4, 5
  rng = np.random.default_rng(4)
  x = rng.standard_normal((1, hw, hw, c)).astype(np.float32)
  ctx = rng.standard_normal((1, t, dc)).astype(np.float32)
  qkv_w, qkv_b = rng.standard_normal((3 * c, c)) * 0.2, rng.standard_normal(3 * c) * 0.2
  ekv_w, ekv_b = rng.standard_normal((2 * c, dc)) * 0.2, rng.standard_normal(2 * c) * 0.2
  out_w, out_b = rng.standard_normal((c, c)) * 0.2, rng.standard_normal(c) * 0.2
  # numpy reference (channels-first, as GLIDE): GroupNorm with 32 groups of 1 channel each here.
  xs = x[0].reshape(hw * hw, c).T                                                       # [C, L]
  xn = (xs - xs.mean(1, keepdims=True)) / np.sqrt(xs.var(1, keepdims=True) + 1e-5)
  qkv = (qkv_w @ xn + qkv_b[:, None]).reshape(heads, 3 * d, -1)
  qh, kh, vh = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
  ekv = (ekv_w @ ctx[0].T + ekv_b[:, None]).reshape(heads, 2 * d, -1)
  kh, vh = np.concatenate([ekv[:, :d], kh], -1), np.concatenate([ekv[:, d:], vh], -1)
  s = d ** -0.25
  logits = np.einsum("hdq,hdk->hqk", qh * s, kh * s)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  a = np.einsum("hqk,hdk->hdq", w, vh).reshape(c, -1)
  want = (xs + out_w @ a + out_b[:, None]).T.reshape(1, hw, hw, c)
  (wq, wk, wv), (bq, bk, bv) = convert_unet.split_heads(qkv_w, qkv_b, heads, d, 3)
  (wek, wev), (bek, bev) = convert_unet.split_heads(ekv_w, ekv_b, heads, d, 2)
  dense = lambda w, b: {"kernel": jnp.asarray(w.T, jnp.float32), "bias": jnp.asarray(b, jnp.float32)}
  p = {"group_norm": {"scale": jnp.ones(c), "bias": jnp.zeros(c)}, "to_q": dense(wq, bq), "to_k": dense(wk, bk),
       "to_v": dense(wv, bv), "add_k_proj": dense(wek, bek), "add_v_proj": dense(wev, bev),
       "to_out_0": dense(out_w, out_b)}
  got = unet_lib.AddedKVAttention(d, groups=32).apply({"params": p}, jnp.asarray(x), jnp.asarray(ctx), None)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


# ---- sharding -------------------------------------------------------------------------------------------------
def _boxed_abstract(model):
  args, kw = builders.unet_dummy_inputs(model)
  return jax.eval_shape(lambda r: model.init(r, *args, **kw), jax.random.key(0))["params"]


def test_karlo_decoder_params_are_sharded():
  """Logical axis names + FSDP fallback leave <= 2% of the Karlo decoder's bytes replicated on a (2,2,2) mesh."""
  from unclip_jax.parallel import mesh as mesh_lib, partitioning

  cfg = config_lib.load_config(os.path.join(ROOT, "configs/decoder.py:karlo"))
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  abstract = _boxed_abstract(builders.unet(cfg.model))
  shardings = partitioning.param_shardings(abstract, mesh, cfg.axis_rules)
  leaves = jax.tree.leaves(partitioning.strip_boxes(abstract))
  nbytes = [x.size * 4 for x in leaves]
  replicated = sum(n for n, s in zip(nbytes, jax.tree.leaves(shardings)) if s.is_fully_replicated)
  assert replicated / sum(nbytes) <= 0.02


def test_sharded_forward_matches(decoder):
  """Converted params placed by the logical rules on a (2,2,2) mesh give the unsharded output."""
  from flax import linen as nn

  from unclip_jax.parallel import mesh as mesh_lib, partitioning

  cfg = config_lib.load_config(os.path.join(ROOT, "configs/decoder.py:tiny"))
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model = builders.unet(decoder["cfg"], dtype="float32")
  shardings = partitioning.param_shardings(_boxed_abstract(model), mesh, cfg.axis_rules, min_bytes=0)
  params = jax.device_put(decoder["params"], shardings)
  x, t, kw = _call_kw(decoder)
  with jax.set_mesh(mesh), nn.logical_axis_rules(cfg.axis_rules):
    out = jax.jit(lambda p, x, t, kw: model.apply({"params": p}, x, t, **kw))(params, x, t, kw)
  np.testing.assert_allclose(np.asarray(out), decoder["got"], rtol=1e-5, atol=1e-5)


def test_load_karlo_decoder_file(tmp_path):
  """A Lightning-style `.ckpt` (read with torch.load(weights_only=True)) of the tiny twin loads; bad files fail."""
  from unclip_jax.models import text_proj as tp_lib

  params = _random_params(lambda: builders.abstract(builders.init_unet, builders.unet(TWIN)), 0)
  tp = _random_params(lambda: builders.abstract(builders.init_text_proj, convert_unet.text_proj_from_block(TP_TWIN)), 1)
  state = convert_unet.params_to_karlo_decoder(params, tp, TWIN, TP_TWIN)
  path = tmp_path / "decoder.ckpt"
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in state.items()}, "global_step": 7}, path)
  _, back, _, tp_back = convert_unet.load_karlo_decoder(path, TWIN, TP_TWIN)
  _assert_trees_equal(back, params)
  _assert_trees_equal(tp_back, tp)
  with pytest.raises(FileNotFoundError, match="nope.ckpt"):
    convert_unet.load_karlo_decoder(tmp_path / "nope.ckpt", TWIN, TP_TWIN)
  (tmp_path / "bad.ckpt").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="bad.ckpt"):
    convert_unet.load_karlo_decoder(tmp_path / "bad.ckpt", TWIN, TP_TWIN)


def test_karlo_constants_match_configs():
  for consts, spec in ((convert_unet.KARLO_DECODER, "configs/decoder.py:karlo"),
                       (convert_unet.KARLO_SR, "configs/upsampler.py:karlo_64_256")):
    cfg = config_lib.load_config(os.path.join(ROOT, spec))
    assert builders.unet(consts) == builders.unet(cfg.model).clone(dropout=0.0)


def test_in_channels_must_match_conditioning():
  with pytest.raises(ValueError, match="does not match model.conditioning='inpaint'"):
    builders.unet(dict(TWIN, conditioning="inpaint", in_channels=3))
  assert builders.unet(dict(TWIN, conditioning="inpaint", in_channels=None)).in_channels == 7
