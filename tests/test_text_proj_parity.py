"""UnCLIPTextProjModel parity (forward with/without CFG, import/export), the channel-major extra tokens, and the
decoder conditioning (text_proj -> mask -> UNet) against diffusers' pipeline order."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

try:
  from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
except ImportError:  # diffusers <= 0.37
  from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel

from unclip_jax.convert import unet as convert_unet  # noqa: E402
from unclip_jax.models import text_proj as tp_lib  # noqa: E402
from unclip_jax.models import unet as unet_lib  # noqa: E402
from unclip_jax.stages import builders  # noqa: E402

import helpers  # noqa: E402

TP_KW = helpers.TP_KW
B, L, E = 2, 16, 32


def make_inputs(seed=0, cfg=True):
  rng = np.random.default_rng(seed)
  bp = 2 * B if cfg else B
  mask = np.ones((bp, L), bool)
  mask[:, 5:] = False
  mask[-1, 9:] = False
  mask[-1, :9] = True
  return dict(img=rng.standard_normal((B, E)).astype(np.float32),
              prompt=rng.standard_normal((bp, E)).astype(np.float32),
              hidden=rng.standard_normal((bp, L, E)).astype(np.float32), mask=mask)


def torch_forward(model, inp, cfg):
  with torch.no_grad():
    ehs, cl = model(image_embeddings=torch.from_numpy(inp["img"]), prompt_embeds=torch.from_numpy(inp["prompt"]),
                    text_encoder_hidden_states=torch.from_numpy(inp["hidden"]), do_classifier_free_guidance=cfg)
  return ehs.numpy(), cl.numpy()


def jax_forward(cfg_block, params, inp, cfg):
  model = convert_unet.text_proj_from_block(cfg_block, dtype="float32")
  out = model.apply({"params": params}, image_embeddings=jnp.asarray(inp["img"]),
                    prompt_embeds=jnp.asarray(inp["prompt"]), text_encoder_hidden_states=jnp.asarray(inp["hidden"]),
                    do_classifier_free_guidance=cfg)
  return tuple(np.asarray(o) for o in out)


@pytest.fixture(scope="module")
def text_proj(tmp_path_factory):
  torch.manual_seed(0)
  model = helpers.randomize(UnCLIPTextProjModel(**TP_KW), 5)     # incl. the zero-initialised CFG embedding
  d = tmp_path_factory.mktemp("text_proj")
  model.save_pretrained(d)
  cfg, params = convert_unet.load_diffusers_text_proj(d)
  return dict(torch=model, dir=d, cfg=cfg, params=params)


def test_config_from_diffusers(text_proj):
  c = text_proj["cfg"]
  assert (c.clip_embeddings_dim, c.time_embed_dim, c.cross_attention_dim, c.clip_extra_context_tokens) == \
      (32, 64, 24, 4)


@pytest.mark.parametrize("cfg", [True, False])
def test_matches_diffusers(text_proj, cfg):
  inp = make_inputs(cfg=cfg)
  (we, wc), (ge, gc) = torch_forward(text_proj["torch"], inp, cfg), jax_forward(text_proj["cfg"],
                                                                                text_proj["params"], inp, cfg)
  assert ge.shape == (2 * B if cfg else B, 4 + L, 24) and gc.shape == (ge.shape[0], 64)
  helpers.compare(ge, we, f"text_proj tokens (cfg={cfg})")
  helpers.compare(gc, wc, f"text_proj class_labels (cfg={cfg})")


def test_export_loads_in_diffusers(text_proj, tmp_path):
  convert_unet.save_diffusers_text_proj(tmp_path, text_proj["params"], text_proj["cfg"])
  back = UnCLIPTextProjModel.from_pretrained(tmp_path).eval()
  inp = make_inputs()
  for a, b in zip(torch_forward(back, inp, True), torch_forward(text_proj["torch"], inp, True)):
    np.testing.assert_array_equal(a, b)


def test_extra_tokens_are_channel_major(text_proj):
  """Linear output row r is channel r // 4 of image token r % 4 (diffusers reshapes channel-major)."""
  inp = make_inputs(cfg=False)
  ehs, _ = jax_forward(text_proj["cfg"], text_proj["params"], inp, False)
  p = text_proj["params"]["clip_extra_context_tokens_proj"]
  flat = inp["img"] @ p["kernel"] + p["bias"]                                            # [B, 4·Dc]
  for r in (0, 1, 5, 4 * 24 - 1):
    np.testing.assert_allclose(ehs[:, r % 4, r // 4], flat[:, r], rtol=1e-5, atol=1e-5)


def test_drop_image_uses_cfg_embedding(text_proj):
  model = convert_unet.text_proj_from_block(text_proj["cfg"])
  inp = make_inputs(cfg=False)
  kw = dict(prompt_embeds=jnp.asarray(inp["prompt"]), text_encoder_hidden_states=jnp.asarray(inp["hidden"]))
  img = jnp.asarray(inp["img"])
  dropped = model.apply({"params": text_proj["params"]}, image_embeddings=img, drop_image=jnp.array([True, False]),
                        **kw)
  cf = jnp.broadcast_to(text_proj["params"]["learned_classifier_free_guidance_embeddings"], img.shape)
  by_hand = model.apply({"params": text_proj["params"]}, image_embeddings=img.at[0].set(cf[0]), **kw)
  for a, b in zip(dropped, by_hand):
    np.testing.assert_array_equal(a, b)


def test_bad_inputs_raise(text_proj):
  model, p = convert_unet.text_proj_from_block(text_proj["cfg"]), {"params": text_proj["params"]}
  inp = make_inputs(cfg=True)
  kw = dict(image_embeddings=inp["img"], prompt_embeds=inp["prompt"], text_encoder_hidden_states=inp["hidden"])
  with pytest.raises(ValueError, match="prompt_embeds must be"):
    model.apply(p, **kw, do_classifier_free_guidance=False)
  with pytest.raises(ValueError, match="image_embeddings must be"):
    model.apply(p, **{**kw, "image_embeddings": inp["img"][:, :5]}, do_classifier_free_guidance=True)
  with pytest.raises(ValueError, match="text_mask must be"):
    model.apply(p, **kw, text_mask=inp["mask"][:, :3], method=tp_lib.UnCLIPTextProj.conditioning)
  with pytest.raises(ValueError, match="lacks the required 'time_embed_dim'"):
    convert_unet.text_proj_config_from_diffusers({"_class_name": "UnCLIPTextProjModel", "cross_attention_dim": 8})


def test_decoder_conditioning_matches_pipeline(text_proj, tmp_path):
  """text_proj -> left-padded mask -> decoder UNet on [uncond; cond], as diffusers' UnCLIPPipeline does."""
  torch.manual_seed(0)
  unet = helpers.randomize(diffusers.UNet2DConditionModel(**helpers.DECODER_KW), 1)
  unet.save_pretrained(tmp_path)
  unet_cfg, unet_params = convert_unet.load_diffusers_unet(tmp_path)
  inp = make_inputs(seed=1, cfg=True)
  x = np.random.default_rng(2).standard_normal((B, 16, 16, 3)).astype(np.float32)
  t = 500
  with torch.no_grad():                         # the pipeline's decoder step
    ehs, cl = text_proj["torch"](image_embeddings=torch.from_numpy(inp["img"]),
                                 prompt_embeds=torch.from_numpy(inp["prompt"]),
                                 text_encoder_hidden_states=torch.from_numpy(inp["hidden"]),
                                 do_classifier_free_guidance=True)
    mask = torch.nn.functional.pad(torch.from_numpy(inp["mask"]), (4, 0), value=True)
    xx = helpers.nchw(np.concatenate([x, x]))
    want = helpers.nhwc(unet(xx, t, encoder_hidden_states=ehs, class_labels=cl, attention_mask=mask).sample)
  tp = convert_unet.text_proj_from_block(text_proj["cfg"])
  cond = tp.apply({"params": text_proj["params"]}, image_embeddings=jnp.asarray(inp["img"]),
                  prompt_embeds=jnp.asarray(inp["prompt"]), text_encoder_hidden_states=jnp.asarray(inp["hidden"]),
                  text_mask=jnp.asarray(inp["mask"]), method=tp_lib.UnCLIPTextProj.conditioning)
  np.testing.assert_array_equal(np.asarray(cond["attention_mask"]), mask.numpy())
  model = builders.unet(unet_cfg, dtype="float32")
  got = jax.jit(lambda p, x, c: model.apply({"params": p}, x, jnp.full((2 * B,), t), **c))(
      unet_params, jnp.concatenate([x, x]), cond)
  helpers.compare(np.asarray(got), want, "text_proj + decoder (CFG batch)")
