"""unclip_jax CLIP vs transformers CLIP: import, forward parity (fp32, CPU), export and reload, loader errors."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from unclip_jax.convert import clip as convert_clip
from unclip_jax.models import clip as clip_lib

TOL = 1e-5
# Tiny configs (docs/layouts.md, "Tiny peer models"); projection_dim differs from the widths so a transposed
# projection fails.
TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30,
              patch_size=2, hidden_act="quick_gelu")
PROJ = 24
REAL_EOS = 7     # the non-legacy pooling rule: first position of this id


def _randomized(model, seed=0):
  """Every parameter ~ N(0, 0.2²) (zeros and ones hide layout bugs); eval mode."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.2)
  return model.eval()


def _legacy_ids(batch=3, length=16, vocab=99, seed=0):
  """Random ids in [3, vocab-2] with BOS=0 first and EOS=vocab-1 (the largest id) at varied positions, pad 1 after."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab - 1, (batch, length))
  ids[:, 0] = 0
  for b, pos in enumerate([5, length - 1, 9][:batch]):
    ids[b, pos] = vocab - 1
    ids[b, pos + 1:] = 1
  return ids


def _pixels(batch=2, size=30, seed=1):
  return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)   # NCHW


def _ours(directory):
  cfg, params = convert_clip.load_hf_clip(directory)
  return clip_lib.CLIP(cfg), params


def _text(model, params, ids, mask=None):
  emb, lhs = model.apply({"params": params}, jnp.asarray(ids), None if mask is None else jnp.asarray(mask),
                         method=model.encode_text)
  return np.asarray(emb), np.asarray(lhs)


def _image(model, params, px_nchw):
  emb, lhs = model.apply({"params": params}, jnp.asarray(px_nchw.transpose(0, 2, 3, 1)), method=model.encode_image)
  return np.asarray(emb), np.asarray(lhs)


def _close(name, got, want, tol=TOL):
  """max|Δ| < tol · max(1, max|want|): absolute for O(1) outputs, relative for larger activations."""
  assert got.shape == want.shape, (name, got.shape, want.shape)
  err, scale = float(np.max(np.abs(got - want))), float(np.max(np.abs(want)))
  print(f"{name}: max|Δ| = {err:.2e} (max|ref| = {scale:.1f})")
  assert err < tol * max(1.0, scale), f"{name}: max|Δ| = {err}, max|ref| = {scale}"
  return err


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
  cfg = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=PROJ)
  model = _randomized(transformers.CLIPModel(cfg))
  with torch.no_grad():
    model.logit_scale.fill_(1.7)
  d = tmp_path_factory.mktemp("clip")
  model.save_pretrained(d)
  return model, str(d)


def _check_clip_model(torch_model, ours, params):
  ids, px = _legacy_ids(), _pixels()
  with torch.no_grad():
    t = torch_model.get_text_features(input_ids=torch.tensor(ids))
    v = torch_model.get_image_features(pixel_values=torch.tensor(px))
    full = torch_model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px))
  te, tl = _text(ours, params, ids)
  ie, il = _image(ours, params, px)
  _close("text_embeds", te, t.pooler_output.numpy())
  _close("text last_hidden_state", tl, t.last_hidden_state.numpy())
  _close("image_embeds", ie, v.pooler_output.numpy())
  _close("image last_hidden_state", il, v.last_hidden_state.numpy())
  norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  logits = np.exp(float(params["logit_scale"])) * norm(te) @ norm(ie).T
  _close("logits_per_text", logits, full.logits_per_text.numpy(), tol=1e-4)


def test_clip_model_matches_transformers(hf_clip):
  torch_model, d = hf_clip
  ours, params = _ours(d)
  assert ours.config.text.eos_token_id == 2 and ours.config.logit_scale
  np.testing.assert_allclose(params["logit_scale"], 1.7)
  _check_clip_model(torch_model, ours, params)


def test_legacy_pooling_is_argmax_not_first_eos(hf_clip):
  """With eos_token_id=2 HF pools at argmax(ids): a row whose largest id is not at the first '2' tells them apart."""
  torch_model, d = hf_clip
  ours, params = _ours(d)
  ids = _legacy_ids()
  ids[0, 3] = 2                                     # an id equal to eos_token_id before the argmax position
  with torch.no_grad():
    want = torch_model.get_text_features(input_ids=torch.tensor(ids)).pooler_output.numpy()
  _close("legacy text_embeds", _text(ours, params, ids)[0], want)


def test_padding_attention_mask_matches_transformers(hf_clip):
  torch_model, d = hf_clip
  ours, params = _ours(d)
  ids = _legacy_ids()
  mask = (np.arange(16)[None] <= np.argmax(ids, -1)[:, None])
  with torch.no_grad():
    t = torch_model.get_text_features(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)))
  te, tl = _text(ours, params, ids, mask)
  _close("masked text_embeds", te, t.pooler_output.numpy())
  _close("masked last_hidden_state", tl, t.last_hidden_state.numpy())


def test_text_with_projection_first_eos_rule_and_gelu(tmp_path):
  """eos_token_id set to a real id: pooling at its FIRST position (pads equal to EOS after it), exact GELU."""
  cfg = transformers.CLIPTextConfig(**{**TEXT, "eos_token_id": REAL_EOS, "hidden_act": "gelu"}, projection_dim=PROJ)
  torch_model = _randomized(transformers.CLIPTextModelWithProjection(cfg), seed=2)
  torch_model.save_pretrained(tmp_path)
  ours, params = _ours(str(tmp_path))
  assert ours.config.vision is None and not ours.config.logit_scale and ours.config.text.act == "gelu"
  rng = np.random.default_rng(3)
  ids = rng.integers(8, 99, (3, 16))
  ids[:, 0] = 0
  ids[0, 4:] = REAL_EOS                                   # EOS used as padding: first one counts
  ids[1, 11] = REAL_EOS
  ids[2, 15] = REAL_EOS
  with torch.no_grad():
    out = torch_model(input_ids=torch.tensor(ids))
  te, tl = _text(ours, params, ids)
  _close("text_embeds (first-eos rule)", te, out.text_embeds.numpy())
  _close("last_hidden_state (gelu)", tl, out.last_hidden_state.numpy())
  # argmax(ids) would pick a different position in every row here, so this checks the rule itself.
  assert not np.array_equal(np.argmax(ids, -1), np.argmax(ids == REAL_EOS, -1))


def test_vision_with_projection_gelu(tmp_path):
  cfg = transformers.CLIPVisionConfig(**{**VISION, "hidden_act": "gelu"}, projection_dim=PROJ)
  torch_model = _randomized(transformers.CLIPVisionModelWithProjection(cfg), seed=4)
  torch_model.save_pretrained(tmp_path)
  ours, params = _ours(str(tmp_path))
  assert ours.config.text is None and ours.config.projection_dim == PROJ
  px = _pixels(seed=5)
  with torch.no_grad():
    out = torch_model(pixel_values=torch.tensor(px))
  ie, il = _image(ours, params, px)
  _close("image_embeds (vision+proj)", ie, out.image_embeds.numpy())
  _close("image last_hidden_state (vision+proj)", il, out.last_hidden_state.numpy())


@pytest.mark.parametrize("tower", ["text", "vision"])
def test_bare_towers_unprefixed_layout(tmp_path, tower):
  if tower == "text":
    torch_model = _randomized(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)), seed=6)
  else:
    torch_model = _randomized(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)), seed=7)
  torch_model.save_pretrained(tmp_path)
  keys = convert_clip.read_state_dict(str(tmp_path / convert_clip.SAFETENSORS_NAME)).keys()
  assert not any(k.startswith(("text_model.", "vision_model.")) for k in keys), "expected the >=5.6 unprefixed layout"
  ours, params = _ours(str(tmp_path))
  assert ours.config.projection_dim is None
  with torch.no_grad():
    if tower == "text":
      ids = _legacy_ids()
      out = torch_model(input_ids=torch.tensor(ids))
      got = _text(ours, params, ids)
    else:
      px = _pixels()
      out = torch_model(pixel_values=torch.tensor(px))
      got = _image(ours, params, px)
  _close(f"bare {tower} pooler_output", got[0], out.pooler_output.numpy())
  _close(f"bare {tower} last_hidden_state", got[1], out.last_hidden_state.numpy())
  # The prefixed layout (transformers < 5.6) and old `position_ids` buffers load to the same params.
  prefix = "text_model." if tower == "text" else "vision_model."
  sd = {prefix + k: v for k, v in torch_model.state_dict().items()}
  sd[prefix + "embeddings.position_ids"] = torch.arange(3)[None]
  again = convert_clip.params_from_state_dict(sd, ours.config)
  np.testing.assert_array_equal(again[prefix[:-1]]["encoder"]["layers_1"]["mlp"]["fc2"]["kernel"],
                                params[prefix[:-1]]["encoder"]["layers_1"]["mlp"]["fc2"]["kernel"])


def test_pytorch_model_bin(tmp_path, hf_clip):
  torch_model, d = hf_clip
  torch.save(torch_model.state_dict(), tmp_path / convert_clip.TORCH_NAME)
  (tmp_path / "config.json").write_text(open(os.path.join(d, "config.json")).read())
  _, params_bin = _ours(str(tmp_path))
  _, params_st = _ours(d)
  flat = lambda p: {k: np.asarray(v) for k, v in _flatten(p)}
  a, b = flat(params_bin), flat(params_st)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _flatten(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def test_export_reloads_in_transformers(tmp_path, hf_clip):
  torch_model, d = hf_clip
  ours, params = _ours(d)
  convert_clip.save_hf_clip(str(tmp_path / "full"), params, ours.config)
  reloaded = transformers.CLIPModel.from_pretrained(tmp_path / "full").eval()
  _check_clip_model(reloaded, ours, params)
  with torch.no_grad():
    for (k, v), (k2, v2) in zip(sorted(reloaded.state_dict().items()), sorted(torch_model.state_dict().items())):
      assert k == k2
      np.testing.assert_array_equal(v.numpy(), v2.numpy(), err_msg=k)
  # Text tower with projection (the unCLIP text encoder) from the same weights.
  text_cfg = clip_lib.CLIPConfig(text=ours.config.text, vision=None, projection_dim=PROJ, logit_scale=False)
  text_params = {k: params[k] for k in ("text_model", "text_projection")}
  convert_clip.save_hf_clip(str(tmp_path / "text"), text_params, text_cfg)
  text_model = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "text").eval()
  ids = _legacy_ids()
  with torch.no_grad():
    out = text_model(input_ids=torch.tensor(ids))
  te, tl = _text(clip_lib.CLIP(text_cfg), text_params, ids)
  _close("exported text_embeds", te, out.text_embeds.numpy())
  _close("exported last_hidden_state", tl, out.last_hidden_state.numpy())
  # And it imports back to the same structure.
  cfg2, params2 = convert_clip.load_hf_clip(str(tmp_path / "text"))
  assert cfg2 == text_cfg


# ---- errors -----------------------------------------------------------------------------------------------------
def test_missing_unexpected_and_misshaped_keys_are_named(hf_clip):
  torch_model, d = hf_clip
  cfg, _ = convert_clip.load_hf_clip(d)
  sd = dict(torch_model.state_dict())
  missing = dict(sd)
  del missing["text_model.encoder.layers.1.self_attn.k_proj.bias"]
  with pytest.raises(ValueError, match=r"missing key 'text_model\.encoder\.layers\.1\.self_attn\.k_proj\.bias'"):
    convert_clip.params_from_state_dict(missing, cfg)
  with pytest.raises(ValueError, match=r"unexpected key 'text_model\.encoder\.layers\.7\.mlp\.fc1\.weight'"):
    convert_clip.params_from_state_dict({**sd, "text_model.encoder.layers.7.mlp.fc1.weight": torch.zeros(37, 32)}, cfg)
  bad = {**sd, "visual_projection.weight": torch.zeros(PROJ + 1, 32)}
  with pytest.raises(ValueError, match=r"shape mismatch for 'visual_projection\.weight'"):
    convert_clip.params_from_state_dict(bad, cfg)


def test_missing_and_corrupt_files_name_the_path(tmp_path, hf_clip):
  _, d = hf_clip
  with pytest.raises(FileNotFoundError, match="nope"):
    convert_clip.load_hf_clip(str(tmp_path / "nope"))
  (tmp_path / "config.json").write_text(open(os.path.join(d, "config.json")).read())
  with pytest.raises(FileNotFoundError, match=r"no model\.safetensors or pytorch_model\.bin"):
    convert_clip.load_hf_clip(str(tmp_path))
  (tmp_path / "model.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
  with pytest.raises(ValueError, match=r"could not read checkpoint .*model\.safetensors"):
    convert_clip.load_hf_clip(str(tmp_path))
  os.remove(tmp_path / "model.safetensors")
  (tmp_path / "pytorch_model.bin").write_bytes(b"garbage")
  with pytest.raises(ValueError, match=r"could not read checkpoint .*pytorch_model\.bin"):
    convert_clip.load_hf_clip(str(tmp_path))
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"corrupt config file .*config\.json"):
    convert_clip.load_hf_clip(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
  with pytest.raises(ValueError, match="unsupported architecture 'BertModel'"):
    convert_clip.load_hf_clip(str(tmp_path))


def test_bad_inputs_raise(hf_clip):
  _, d = hf_clip
  ours, params = _ours(d)
  with pytest.raises(ValueError, match="context_length=16"):
    _text(ours, params, np.zeros((1, 17), np.int64))
  with pytest.raises(ValueError, match="NHWC"):
    ours.apply({"params": params}, jnp.zeros((1, 3, 30, 30)), method=ours.encode_image)


# ---- OpenAI CLIP layout -----------------------------------------------------------------------------------------
def _openai_state_dict(hf_sd):
  """Writes an HF CLIPModel state dict in OpenAI's `clip/model.py` layout (block-ordered in_proj = cat(q, k, v))."""
  out = {}
  for tower, src in (("", "text_model."), ("visual.", "vision_model.")):
    layers = {k.split(".")[3] for k in hf_sd if k.startswith(src + "encoder.layers.")}
    for i in sorted(layers):
      a, b = f"{src}encoder.layers.{i}.", f"{tower}transformer.resblocks.{i}."
      for leaf in ("weight", "bias"):
        out[b + f"attn.in_proj_{leaf}"] = torch.cat([hf_sd[a + f"self_attn.{n}_proj.{leaf}"] for n in "qkv"])
        for theirs, ours in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                             ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
          out[b + f"{theirs}.{leaf}"] = hf_sd[a + f"{ours}.{leaf}"]
  t, v = "text_model.", "vision_model."
  out.update({
      "token_embedding.weight": hf_sd[t + "embeddings.token_embedding.weight"],
      "positional_embedding": hf_sd[t + "embeddings.position_embedding.weight"],
      "ln_final.weight": hf_sd[t + "final_layer_norm.weight"], "ln_final.bias": hf_sd[t + "final_layer_norm.bias"],
      "text_projection": hf_sd["text_projection.weight"].T, "logit_scale": hf_sd["logit_scale"],
      "visual.conv1.weight": hf_sd[v + "embeddings.patch_embedding.weight"],
      "visual.class_embedding": hf_sd[v + "embeddings.class_embedding"],
      "visual.positional_embedding": hf_sd[v + "embeddings.position_embedding.weight"],
      "visual.ln_pre.weight": hf_sd[v + "pre_layrnorm.weight"], "visual.ln_pre.bias": hf_sd[v + "pre_layrnorm.bias"],
      "visual.ln_post.weight": hf_sd[v + "post_layernorm.weight"],
      "visual.ln_post.bias": hf_sd[v + "post_layernorm.bias"], "visual.proj": hf_sd["visual_projection.weight"].T,
      "input_resolution": torch.tensor(30), "context_length": torch.tensor(16), "vocab_size": torch.tensor(99),
  })
  return out


def test_openai_layout_import(tmp_path):
  # OpenAI models have 64-wide heads: width 128 with 2 heads.
  text = {**TEXT, "hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 2}
  vision = {**VISION, "hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 2}
  torch_model = _randomized(transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                                          projection_dim=PROJ)), seed=8)
  hf_sd = torch_model.state_dict()
  sd = _openai_state_dict(hf_sd)
  # The layout assumption, checked against torch itself: OpenAI's blocks are nn.MultiheadAttention, whose
  # in_proj_weight/in_proj_bias are [Q; K; V]; loaded with ours they reproduce HF's CLIPAttention.
  mha = torch.nn.MultiheadAttention(128, 2, batch_first=True)
  mha.load_state_dict({"in_proj_weight": sd["transformer.resblocks.0.attn.in_proj_weight"],
                       "in_proj_bias": sd["transformer.resblocks.0.attn.in_proj_bias"],
                       "out_proj.weight": sd["transformer.resblocks.0.attn.out_proj.weight"],
                       "out_proj.bias": sd["transformer.resblocks.0.attn.out_proj.bias"]})
  x = torch.randn(2, 5, 128)
  with torch.no_grad():
    want_attn = torch_model.text_model.encoder.layers[0].self_attn(x)[0]
    got_attn = mha(x, x, x, need_weights=False)[0]
  scale = float(want_attn.abs().max())
  _close("MultiheadAttention vs CLIPAttention (relative)", got_attn.numpy() / scale, want_attn.numpy() / scale)

  torch.save(sd, tmp_path / "ViT-tiny.pt")
  cfg, params = convert_clip.load_openai_clip(str(tmp_path / "ViT-tiny.pt"))
  assert cfg.text.heads == 2 and cfg.vision.heads == 2 and cfg.vision.image_size == 30 and cfg.vision.patch_size == 2
  _check_clip_model(torch_model, clip_lib.CLIP(cfg), params)


def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
  torch_model = _randomized(transformers.CLIPTextModelWithProjection(
      transformers.CLIPTextConfig(**TEXT, projection_dim=PROJ)), seed=9).to(torch.bfloat16)
  torch_model.save_pretrained(tmp_path)
  _, params = _ours(str(tmp_path))
  got = params["text_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  want = torch_model.text_model.encoder.layers[0].self_attn.q_proj.weight.detach().float().numpy().T
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want)
