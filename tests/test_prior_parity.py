"""Prior parity with diffusers' PriorTransformer (forward, diffusers import/export) and the Karlo layout."""
import json

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from unclip_jax.convert import prior as convert_prior  # noqa: E402
from unclip_jax.models import prior as prior_lib  # noqa: E402
from unclip_jax.stages import builders  # noqa: E402
from unclip_jax.stages import prior as prior_stage  # noqa: E402

from helpers import PRIOR_KW, make_torch_prior  # noqa: E402

TINY_KW = PRIOR_KW
B = 3


def make_inputs(seed=0):
  rng = np.random.default_rng(seed)
  e, l = TINY_KW["embedding_dim"], TINY_KW["num_embeddings"]
  lengths = np.array([l, 5, 1])[:B]
  return dict(x=rng.standard_normal((B, e)).astype(np.float32), t=np.array([999, 500, 3][:B], np.int64),
              emb=rng.standard_normal((B, e)).astype(np.float32),
              enc=rng.standard_normal((B, l, e)).astype(np.float32),
              mask=np.arange(l)[None, :] < lengths[:, None])


def torch_forward(model, inp):
  with torch.no_grad():
    outs = [model(torch.from_numpy(inp["x"][i:i + 1]), timestep=int(inp["t"][i]),
                  proj_embedding=torch.from_numpy(inp["emb"][i:i + 1]),
                  encoder_hidden_states=torch.from_numpy(inp["enc"][i:i + 1]),
                  attention_mask=torch.from_numpy(inp["mask"][i:i + 1])).predicted_image_embedding
            for i in range(B)]
  return torch.cat(outs).numpy()


def jax_forward(model_cfg, params, inp):
  model = builders.prior(model_cfg, dtype="float32")
  return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(inp["x"]), jnp.asarray(inp["t"], jnp.int32),
                                jnp.asarray(inp["emb"]), jnp.asarray(inp["enc"]), jnp.asarray(inp["mask"])))


@pytest.fixture(scope="module")
def torch_prior():
  return make_torch_prior()


@pytest.fixture(scope="module")
def saved_dir(torch_prior, tmp_path_factory):
  d = tmp_path_factory.mktemp("prior_diffusers")
  torch_prior.save_pretrained(d)
  return d


@pytest.fixture(scope="module")
def converted(saved_dir):
  return convert_prior.load_diffusers(saved_dir)


def test_config_from_diffusers(converted):
  cfg, _ = converted
  assert (cfg.embedding_dim, cfg.num_embeddings, cfg.num_layers, cfg.num_heads, cfg.head_dim) == (32, 16, 2, 2, 12)


def test_forward_matches_diffusers(torch_prior, converted):
  cfg, params = converted
  inp = make_inputs()
  want, got = torch_forward(torch_prior, inp), jax_forward(cfg, params, inp)
  err = np.abs(want - got).max()
  print(f"prior forward max|Δ| vs diffusers = {err:.2e}")
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_denormalize_matches_post_process(torch_prior, converted):
  cfg, params = converted
  x = np.random.default_rng(1).standard_normal((B, 32)).astype(np.float32)
  model = builders.prior(cfg)
  got = model.apply({"params": params}, jnp.asarray(x), method=prior_lib.PriorTransformer.denormalize)
  want = torch_prior.post_process_latents(torch.from_numpy(x)).detach().numpy()
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6, rtol=1e-6)
  back = model.apply({"params": params}, got, method=prior_lib.PriorTransformer.normalize)
  np.testing.assert_allclose(np.asarray(back), x, atol=1e-5)


def test_batched_timesteps_and_causality(converted):
  """A batch with per-example timesteps equals per-example calls; future tokens never leak backwards."""
  cfg, params = converted
  model = builders.prior(cfg)
  inp = make_inputs()
  out = jax_forward(cfg, params, inp)
  one = model.apply({"params": params}, jnp.asarray(inp["x"][1:2]), 500, jnp.asarray(inp["emb"][1:2]),
                    jnp.asarray(inp["enc"][1:2]), jnp.asarray(inp["mask"][1:2]))
  np.testing.assert_allclose(np.asarray(one)[0], out[1], atol=1e-6)
  # Padded text tokens do not influence the output.
  enc2 = inp["enc"].copy()
  enc2[~inp["mask"]] = 123.0
  out2 = jax_forward(cfg, params, dict(inp, enc=enc2))
  np.testing.assert_allclose(out2, out, atol=1e-5)


def test_export_roundtrip_through_diffusers(torch_prior, converted, tmp_path):
  cfg, params = converted
  convert_prior.save_diffusers(tmp_path, params, cfg)
  reloaded = diffusers.PriorTransformer.from_pretrained(tmp_path).eval()
  inp = make_inputs(2)
  want, got = torch_forward(torch_prior, inp), torch_forward(reloaded, inp)
  err = np.abs(want - got).max()
  print(f"exported prior (diffusers from_pretrained) max|Δ| = {err:.2e}")
  np.testing.assert_array_equal(got, want)
  ref = torch_prior.state_dict()
  for k, v in reloaded.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), ref[k].numpy(), err_msg=k)
  cfg2, params2 = convert_prior.load_diffusers(tmp_path)
  assert cfg2.to_dict() == cfg.to_dict()
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_karlo_roundtrip(converted):
  cfg, params = converted
  karlo, (mean, std) = convert_prior.params_to_karlo(params, cfg)
  assert all(k.startswith("model.") for k in karlo)
  assert karlo["model.transformer.resblocks.0.attn.c_qkv.weight"].shape == (3 * 24, 24)
  back = convert_prior.karlo_to_params(karlo, cfg, (mean, std))
  jax.tree.map(np.testing.assert_array_equal, back, params)
  # Torch tensors (as torch.load gives them) work too.
  back_t = convert_prior.karlo_to_params({k: torch.from_numpy(v) for k, v in karlo.items()}, cfg,
                                         (torch.from_numpy(mean), torch.from_numpy(std)))
  jax.tree.map(np.testing.assert_array_equal, back_t, params)


def test_karlo_file_loading(converted, tmp_path):
  cfg, params = converted
  karlo, (mean, std) = convert_prior.params_to_karlo(params, cfg)
  ckpt, stats = tmp_path / "prior.ckpt", tmp_path / "stats.th"
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in karlo.items()}}, ckpt)
  torch.save((torch.from_numpy(mean), torch.from_numpy(std)), stats)
  _, back = convert_prior.load_karlo(ckpt, stats, cfg)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  with pytest.raises(FileNotFoundError, match="nope.ckpt"):
    convert_prior.load_karlo(tmp_path / "nope.ckpt", stats, cfg)
  (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match="bad.ckpt"):
    convert_prior.load_karlo(tmp_path / "bad.ckpt", stats, cfg)
  with pytest.raises(ValueError, match="CLIP statistics"):
    convert_prior.karlo_to_params(karlo, cfg)


def test_split_heads_against_hand_made_case():
  """The per-head split: chunk n of d rows of the fused c_qkv goes to output n mod 3 (head n // 3)."""
  heads, d, cin = 2, 3, 4
  # Row r of the fused weight holds the value 100·r + column, so every row is identifiable.
  fused = np.arange(3 * heads * d)[:, None] * 100.0 + np.arange(cin)[None, :]
  bias = np.arange(3 * heads * d, dtype=np.float64)
  (wq, wk, wv), (bq, bk, bv) = convert_prior.split_heads(fused, bias, heads, d, 3)
  # Hand-made: rows [q_h0 (0-2), k_h0 (3-5), v_h0 (6-8), q_h1 (9-11), k_h1 (12-14), v_h1 (15-17)].
  np.testing.assert_array_equal(bq, [0, 1, 2, 9, 10, 11])
  np.testing.assert_array_equal(bk, [3, 4, 5, 12, 13, 14])
  np.testing.assert_array_equal(bv, [6, 7, 8, 15, 16, 17])
  np.testing.assert_array_equal(wk[:, 0], [300, 400, 500, 1200, 1300, 1400])
  w, b = convert_prior.join_heads([wq, wk, wv], [bq, bk, bv], heads, d)
  np.testing.assert_array_equal(w, fused)
  np.testing.assert_array_equal(b, bias)


def test_karlo_interleaving_is_semantic(converted):
  """A hand-built per-head interleaved c_qkv imports to the expected to_q/to_k/to_v kernels."""
  cfg, params = converted
  karlo, stats = convert_prior.params_to_karlo(params, cfg)
  h, d, inner = cfg.num_heads, cfg.head_dim, cfg.num_heads * cfg.head_dim
  q, k, v = (np.random.default_rng(i).standard_normal((inner, inner)).astype(np.float32) for i in range(3))
  rows = []
  for head in range(h):
    for m in (q, k, v):
      rows.append(m[head * d:(head + 1) * d])
  karlo = dict(karlo)
  karlo["model.transformer.resblocks.1.attn.c_qkv.weight"] = np.concatenate(rows)
  back = convert_prior.karlo_to_params(karlo, cfg, stats)
  attn = back["transformer_blocks_1"]["attn1"]
  np.testing.assert_array_equal(attn["to_q"]["kernel"], q.T)
  np.testing.assert_array_equal(attn["to_k"]["kernel"], k.T)
  np.testing.assert_array_equal(attn["to_v"]["kernel"], v.T)


def test_bad_checkpoints_name_the_key(torch_prior, converted, tmp_path):
  cfg, _ = converted
  state = {k: v.numpy() for k, v in torch_prior.state_dict().items()}
  missing = dict(state)
  del missing["transformer_blocks.1.ff.net.2.bias"]
  with pytest.raises(ValueError, match=r"transformer_blocks\.1\.ff\.net\.2\.bias"):
    convert_prior.diffusers_to_params(missing, cfg)
  with pytest.raises(ValueError, match="bogus.weight"):
    convert_prior.diffusers_to_params(dict(state, **{"bogus.weight": np.zeros((2, 2), np.float32)}), cfg)
  shaped = dict(state, **{"proj_in.weight": np.zeros((24, 31), np.float32)})
  with pytest.raises(ValueError, match="proj_in.weight"):
    convert_prior.diffusers_to_params(shaped, cfg)
  with pytest.raises(FileNotFoundError, match="config.json"):
    convert_prior.load_diffusers(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(dict(TINY_KW, _class_name="PriorTransformer")))
  (tmp_path / convert_prior.SAFETENSORS_NAME).write_bytes(b"\x00garbage")
  with pytest.raises(ValueError, match=convert_prior.SAFETENSORS_NAME):
    convert_prior.load_diffusers(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(dict(TINY_KW, norm_in_type="layer")))
  with pytest.raises(ValueError, match="norm_in_type"):
    convert_prior.load_diffusers(tmp_path)


def test_bad_inputs_raise(converted):
  cfg, params = converted
  model = builders.prior(cfg)
  inp = make_inputs()
  args = [jnp.asarray(inp[k]) for k in ("x", "t", "emb", "enc", "mask")]
  with pytest.raises(ValueError, match="text_mask"):
    model.apply({"params": params}, *args[:4], None)
  with pytest.raises(ValueError, match="x_t must be"):
    model.apply({"params": params}, jnp.zeros((B, 31)), *args[1:])
  with pytest.raises(ValueError, match="text_enc must be"):
    model.apply({"params": params}, *args[:3], jnp.zeros((B, 15, 32)), args[4])
  with pytest.raises(ValueError, match="text_emb must be"):
    model.apply({"params": params}, args[0], args[1], jnp.zeros((B, 16)), *args[3:])


def test_bf16_compute_and_remat_close(converted):
  cfg, params = converted
  inp = make_inputs()
  ref = jax_forward(cfg, params, inp)
  args = [jnp.asarray(inp[k]) for k in ("x", "t", "emb", "enc", "mask")]
  remat = builders.prior(cfg, remat="full")
  np.testing.assert_allclose(np.asarray(jax.jit(remat.apply)({"params": params}, *args)), ref, atol=1e-6)
  bf16 = builders.prior(cfg, dtype="bfloat16")
  out = np.asarray(jax.jit(bf16.apply)({"params": params}, *args))
  assert out.dtype == np.float32
  assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()


def test_configs_build_and_karlo_size():
  """configs/prior.py variants build; the karlo variant has diffusers' Karlo prior size (338 tensors,
  1022.0 M params) and converts its config both ways."""
  from unclip_jax import config_lib

  tiny = config_lib.load_config("configs/prior.py:tiny")
  model = builders.prior(tiny.model, dtype=tiny.dtype)
  assert model.dtype == jnp.bfloat16
  karlo = config_lib.load_config("configs/prior.py:karlo")
  shapes = builders.abstract(builders.init_prior, builders.prior(karlo.model))
  leaves = jax.tree.leaves(shapes)
  assert len(leaves) == 338
  assert round(sum(int(np.prod(x.shape)) for x in leaves) / 1e6, 1) == 1022.0
  as_diffusers = convert_prior.diffusers_config_from_model(karlo.model)
  back = convert_prior.model_config_from_diffusers(as_diffusers)
  for k in ("embedding_dim", "num_embeddings", "num_layers", "num_heads", "head_dim"):
    assert back[k] == karlo.model[k]
  sig = set(__import__("inspect").signature(diffusers.PriorTransformer.__init__).parameters)
  assert set(as_diffusers) - {"_class_name", "_diffusers_version"} <= sig


def test_sharded_init_and_apply_on_mesh():
  """Logical axes resolve with config_lib.AXIS_RULES; sharded init + jitted apply on a (2, 2, 2) CPU mesh."""
  import flax.linen as nn

  from unclip_jax import config_lib

  if jax.device_count() < 8:
    pytest.skip("needs 8 (forced CPU) devices")
  model = prior_lib.PriorTransformer(embedding_dim=32, num_embeddings=16, num_layers=2, num_heads=2, head_dim=12)
  args = builders.prior_dummy_inputs(model, 8)
  specs = nn.get_partition_spec(jax.eval_shape(model.init, jax.random.key(0), *args))
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, config_lib.AXIS_RULES)
  with jax.set_mesh(mesh), nn.logical_axis_rules(config_lib.AXIS_RULES):
    variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), *args)
    out = jax.jit(model.apply)(nn.unbox(variables), *args)
  assert out.shape == (8, 32)
  kernel = variables["params"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"].value
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_sqrt_dim_normalization():
  """DALLE2-pytorch scaling: normalize = l2norm·√E, denormalize = /√E (unit-norm CLIP embeddings)."""
  model = prior_lib.PriorTransformer(embedding_dim=32, num_embeddings=16, num_layers=1, num_heads=2, head_dim=12,
                                     normalization="sqrt_dim")
  params = builders.init_prior(model, jax.random.key(0))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32)), jnp.float32)
  n = model.apply({"params": params}, x, method=prior_lib.PriorTransformer.normalize)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(n), axis=-1), np.sqrt(32), rtol=1e-5)
  back = model.apply({"params": params}, n, method=prior_lib.PriorTransformer.denormalize)
  np.testing.assert_allclose(np.asarray(back), np.asarray(x / jnp.linalg.norm(x, axis=-1, keepdims=True)), atol=1e-6)
  cfg = mlc.ConfigDict(dict(embedding_dim=32, num_embeddings=16, num_layers=1, num_heads=2, head_dim=12,
                            normalization="sqrt_dim"))
  with pytest.raises(ValueError, match="clip_stats"):
    convert_prior.diffusers_config_from_model(cfg)
  with pytest.raises(ValueError, match="normalization"):
    builders.init_prior(prior_lib.PriorTransformer(normalization="l2"), jax.random.key(0))


def test_scanned_layers_match_loop(converted):
  """scan_layers=True (with and without remat) on stacked params equals the Python loop; stack/unstack invert."""
  import flax.linen as nn

  cfg, params = converted
  inp = make_inputs()
  args = [jnp.asarray(inp[k]) for k in ("x", "t", "emb", "enc", "mask")]
  ref = jax_forward(cfg, params, inp)
  stacked = prior_stage.stack_blocks(params, cfg.num_layers)
  for remat in ("none", "full"):
    model = builders.prior({**cfg.to_dict(), "scan_layers": True}, remat=remat)
    shapes = builders.abstract(builders.init_prior, model)
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), shapes, stacked)
    out = np.asarray(jax.jit(model.apply)({"params": stacked}, *args))
    np.testing.assert_allclose(out, ref, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, prior_stage.unstack_blocks(stacked), params)
  want = convert_prior.params_to_diffusers(params, cfg)
  got = convert_prior.params_to_diffusers(stacked, cfg)
  assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
  specs = nn.get_partition_spec(jax.eval_shape(model.init, jax.random.key(0), *builders.prior_dummy_inputs(model)))
  assert specs["params"]["transformer_blocks"]["attn1"]["to_q"]["kernel"] == jax.sharding.PartitionSpec(
      "layers", "embed", "heads")


def test_karlo_fused_qkv_attention_semantics(converted):
  """Exported c_qkv/c_proj used the way Karlo's QKVMultiheadAttention uses them (view(B, T, H, 3d) then split
  q, k, v along the last axis, q and k each scaled by d^-1/4) reproduce our attn1 output."""
  cfg, params = converted
  karlo, _ = convert_prior.params_to_karlo(params, cfg)
  h, d = cfg.num_heads, cfg.head_dim
  x = np.random.default_rng(0).standard_normal((2, 7, h * d)).astype(np.float32)
  pre = "model.transformer.resblocks.0.attn"
  qkv = x @ karlo[f"{pre}.c_qkv.weight"].T + karlo[f"{pre}.c_qkv.bias"]                 # [B, T, 3·H·d]
  qkv = qkv.reshape(2, 7, h, 3 * d)
  q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
  scale = d ** -0.25
  w = np.einsum("bthc,bshc->bhts", q * scale, k * scale)
  w = np.exp(w - w.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  a = np.einsum("bhts,bshc->bthc", w, v).reshape(2, 7, h * d)
  want = a @ karlo[f"{pre}.c_proj.weight"].T + karlo[f"{pre}.c_proj.bias"]
  attn = prior_lib.Attention(h, d)
  got = attn.apply({"params": params["transformer_blocks_0"]["attn1"]}, jnp.asarray(x), None)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)
