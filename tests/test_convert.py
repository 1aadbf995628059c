"""`python -m unclip_jax.convert`: a tiny diffusers Karlo folder -> bundle -> forward parity with the torch modules;
bundle -> diffusers / safetensors exports reload exactly; original Karlo and GLIDE layouts; clear errors."""
import contextlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

try:
  from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
except ImportError:  # diffusers <= 0.37
  from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel

from unclip_jax import bundle  # noqa: E402
from unclip_jax.convert import cli as convert  # noqa: E402
from unclip_jax.convert import glide as convert_glide_text, prior as convert_prior, unet as convert_unet  # noqa: E402
from unclip_jax.models import clip as clip_lib  # noqa: E402
from unclip_jax.models import glide_text, prior as prior_lib, text_proj as tp_lib, unet as unet_lib  # noqa: E402
from unclip_jax.stages import builders  # noqa: E402
from unclip_jax.stages import prior as prior_stage  # noqa: E402
from helpers import (DECODER_KW, PRIOR_KW, SCHEDULERS, SR_KW, TEXT, TP_KW, VISION, randomize,  # noqa: E402,F401
                     save_tiny_karlo, tiny_tokenizer)

B, L, E = 2, 16, 32


def close(what, got, want, tol=1e-5):
  """max|Δ| < tol·max(1, max|want|)."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  err, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
  print(f"{what}: max|Δ|={err:.2e} (max|want|={scale:.2f})")
  assert err < tol * max(1.0, scale), f"{what}: max|Δ|={err:.3g}, max|want|={scale:.3g}"


def run_cli(*argv):
  """convert.main in-process -> (exit code, stdout, stderr)."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = convert.main([str(a) for a in argv])
  return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def karlo(tmp_path_factory):
  """A diffusers Karlo folder saved by the real UnCLIPPipeline (0.42 model_index) + an image_encoder folder."""
  root = tmp_path_factory.mktemp("karlo")
  saved = save_tiny_karlo(root)
  src = saved["src"]
  out = root / "bundle"
  code, stdout, stderr = run_cli("karlo-diffusers", src, out)
  assert code == 0, stderr
  return dict(src=src, out=out, stdout=stdout, torch=saved["torch"], schedulers=saved["schedulers"])


@pytest.fixture(scope="module")
def loaded(karlo):
  """Every component of the imported bundle, through bundle.load_component (names and shapes checked)."""
  return {name: bundle.load_component(karlo["out"], name) for name in bundle.list_components(karlo["out"])}


def test_karlo_import_writes_every_component_and_a_summary(karlo):
  manifest = bundle.read_manifest(karlo["out"])
  assert manifest["format"] == "unclip_jax.bundle" and manifest["schema"] == 1
  assert manifest["components"] == ["clip", "prior", "decoder", "super_res_first", "super_res_last"]
  assert "karlo-diffusers:" in manifest["source"]
  print(karlo["stdout"])
  lines = {ln.split()[0]: ln.split() for ln in karlo["stdout"].splitlines() if ln and not ln.startswith(" ")}
  for name, torch_name in (("prior", "prior"), ("super_res_first", "super_res_first")):
    n = len(karlo["torch"][torch_name].state_dict())
    assert lines[name][1:3] == [str(n), str(n)] and lines[name][-1] == "none"
  n_dec = len(karlo["torch"]["decoder"].state_dict()) + len(karlo["torch"]["text_proj"].state_dict())
  assert lines["decoder"][1] == str(n_dec)
  n_params = sum(p.numel() for p in karlo["torch"]["prior"].parameters())
  assert lines["prior"][3] == f"{n_params:,}"


def test_karlo_configs_take_sizes_from_files_and_karlo_sampling_defaults(loaded):
  prior_cfg, _ = loaded["prior"]
  assert (prior_cfg.model.embedding_dim, prior_cfg.model.num_layers, prior_cfg.model.head_dim) == (32, 2, 12)
  sampling = prior_cfg.sampling
  assert (sampling.steps, sampling.guidance_scale, sampling.clip_range) == ("25", 4.0, 5.0)
  assert prior_cfg.diffusion.prediction == "x0" and prior_cfg.null_text == "empty_prompt"
  dec_cfg, _ = loaded["decoder"]
  assert (dec_cfg.sampling.steps, dec_cfg.sampling.guidance_scale) == ("25", 8.0)
  assert dec_cfg.model.block_out_channels == (16, 32, 48) and dec_cfg.diffusion.variance == "learned_range"
  assert dec_cfg.null_text == "empty_prompt"
  for name in ("super_res_first", "super_res_last"):
    sr_cfg, _ = loaded[name]
    assert sr_cfg.sampling.steps == "7" and sr_cfg.model.in_channels == 6
    assert (sr_cfg.model.image_size, sr_cfg.model.low_res_size) == (32, 16)
  clip_cfg, _ = loaded["clip"]
  assert clip_cfg.model.text.width == 32 and clip_cfg.model.vision.patch_size == 2
  assert clip_cfg.model.projection_dim == 32 and not clip_cfg.model.logit_scale


def test_bundle_clip_matches_transformers(karlo, loaded):
  cfg, params = loaded["clip"]
  model = builders.clip(cfg.model, dtype="float32")
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 98, (B, L))
  ids[0, 6], ids[0, 7:] = 98, 1                 # EOS = the largest id (argmax pooling), then padding
  ids[1, 15] = 98
  px = rng.standard_normal((B, 3, 30, 30)).astype(np.float32)
  with torch.no_grad():
    t = karlo["torch"]["text_encoder"](input_ids=torch.tensor(ids))
    v = karlo["torch"]["image_encoder"](pixel_values=torch.tensor(px))
  emb, lhs = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_text))(params, jnp.asarray(ids))
  close("clip text_embeds", emb, t.text_embeds.numpy())
  close("clip last_hidden_state", lhs, t.last_hidden_state.numpy())
  iemb, _ = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_image))(
      params, jnp.asarray(px.transpose(0, 2, 3, 1)))
  close("clip image_embeds", iemb, v.image_embeds.numpy())


def test_bundle_prior_matches_diffusers(karlo, loaded):
  cfg, params = loaded["prior"]
  model = builders.prior(cfg.model, dtype="float32")
  rng = np.random.default_rng(1)
  x, emb = rng.standard_normal((B, E)).astype(np.float32), rng.standard_normal((B, E)).astype(np.float32)
  enc = rng.standard_normal((B, L, E)).astype(np.float32)
  mask = np.arange(L)[None] < np.array([[L], [5]])
  t = np.array([999, 3])
  with torch.no_grad():
    want = np.concatenate([karlo["torch"]["prior"](
        torch.from_numpy(x[i:i + 1]), timestep=int(t[i]), proj_embedding=torch.from_numpy(emb[i:i + 1]),
        encoder_hidden_states=torch.from_numpy(enc[i:i + 1]),
        attention_mask=torch.from_numpy(mask[i:i + 1])).predicted_image_embedding.numpy() for i in range(B)])
  got = jax.jit(model.apply)({"params": params}, jnp.asarray(x), jnp.asarray(t, jnp.int32), jnp.asarray(emb),
                             jnp.asarray(enc), jnp.asarray(mask))
  close("prior x0", got, want)
  with torch.no_grad():
    want_post = karlo["torch"]["prior"].post_process_latents(torch.from_numpy(x)).numpy()
  close("prior post_process_latents", model.apply({"params": params}, jnp.asarray(x), method=model.denormalize),
        want_post)


def test_bundle_decoder_matches_diffusers(karlo, loaded):
  """text_proj (with CFG) -> decoder mask -> UNet, as UnCLIPPipeline chains them."""
  cfg, params = loaded["decoder"]
  rng = np.random.default_rng(2)
  img = rng.standard_normal((B, E)).astype(np.float32)
  prompt = rng.standard_normal((2 * B, E)).astype(np.float32)
  hidden = rng.standard_normal((2 * B, L, E)).astype(np.float32)
  text_mask = np.arange(L)[None] < np.array([[2], [L], [2], [6]])
  x = rng.standard_normal((2 * B, 16, 16, 3)).astype(np.float32)
  t = np.array([999, 999, 40, 40])
  with torch.no_grad():
    ehs, class_labels = karlo["torch"]["text_proj"](
        image_embeddings=torch.from_numpy(img), prompt_embeds=torch.from_numpy(prompt),
        text_encoder_hidden_states=torch.from_numpy(hidden), do_classifier_free_guidance=True)
    mask = torch.nn.functional.pad(torch.from_numpy(text_mask), (4, 0), value=True)
    want = karlo["torch"]["decoder"](torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                                     encoder_hidden_states=ehs, class_labels=class_labels,
                                     attention_mask=mask).sample.numpy().transpose(0, 2, 3, 1)
  text_proj = builders.text_proj(cfg.model, dtype="float32")
  unet = builders.unet(cfg.model, dtype="float32")

  @jax.jit
  def ours(params, x, t, img, prompt, hidden, text_mask):
    cond = text_proj.apply({"params": params["text_proj"]}, image_embeddings=img, prompt_embeds=prompt,
                           text_encoder_hidden_states=hidden, text_mask=text_mask, do_classifier_free_guidance=True,
                           method=type(text_proj).conditioning)
    return cond, unet.apply({"params": params["unet"]}, x, t, **cond)

  cond, got = ours(params, *map(jnp.asarray, (x, t, img, prompt, hidden, text_mask)))
  close("text_proj encoder_hidden_states", cond["encoder_hidden_states"], ehs.numpy())
  close("text_proj class_labels", cond["class_labels"], class_labels.numpy())
  close("decoder UNet output", got, want, tol=1e-4)


def test_bundle_super_res_match_diffusers(karlo, loaded):
  rng = np.random.default_rng(3)
  x = rng.standard_normal((B, 32, 32, 6)).astype(np.float32)
  t = np.array([999, 0])
  outs = {}
  for name in ("super_res_first", "super_res_last"):
    cfg, params = loaded[name]
    model = builders.unet(cfg.model, dtype="float32")
    with torch.no_grad():
      want = karlo["torch"][name](torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t)).sample
    outs[name] = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(x), jnp.asarray(t)))
    close(f"{name} output", outs[name], want.numpy().transpose(0, 2, 3, 1), tol=1e-4)
  assert np.abs(outs["super_res_first"] - outs["super_res_last"]).max() > 1e-2   # two different models


def _assert_same_state(reloaded, original, what):
  got, want = reloaded.state_dict(), original.state_dict()
  assert sorted(got) == sorted(want), f"{what}: keys differ"
  for k in want:
    assert torch.equal(got[k], want[k]), f"{what}: {k} differs"


def test_to_diffusers_reloads_every_component_exactly(karlo, tmp_path):
  code, stdout, stderr = run_cli("to-diffusers", karlo["out"], tmp_path)
  assert code == 0, stderr
  assert "text_encoder" in stdout and "super_res_last" in stdout
  loaded = dict(
      prior=diffusers.PriorTransformer.from_pretrained(tmp_path, subfolder="prior"),
      text_proj=UnCLIPTextProjModel.from_pretrained(tmp_path / "text_proj"),
      decoder=diffusers.UNet2DConditionModel.from_pretrained(tmp_path, subfolder="decoder"),
      super_res_first=diffusers.UNet2DModel.from_pretrained(tmp_path, subfolder="super_res_first"),
      super_res_last=diffusers.UNet2DModel.from_pretrained(tmp_path, subfolder="super_res_last"),
      text_encoder=transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "text_encoder"),
      image_encoder=transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path / "image_encoder"))
  for name, model in loaded.items():
    _assert_same_state(model, karlo["torch"][name], name)
  index = json.loads((tmp_path / "model_index.json").read_text())
  assert index["_class_name"] == "UnCLIPPipeline" and index["text_proj"] == ["unclip", "UnCLIPTextProjModel"]
  assert index["decoder"] == ["diffusers", "UNet2DConditionModel"] and "image_encoder" not in index
  for name, sched in karlo["schedulers"].items():
    back = diffusers.UnCLIPScheduler.from_pretrained(tmp_path, subfolder=name)
    for key in ("variance_type", "prediction_type", "clip_sample", "clip_sample_range", "num_train_timesteps"):
      assert back.config[key] == sched.config[key], (name, key)


def test_to_safetensors_uses_the_pytorch_key_layouts(karlo, tmp_path):
  from safetensors.numpy import load_file

  code, _, stderr = run_cli("to-safetensors", karlo["out"], tmp_path)
  assert code == 0, stderr
  for name in ("prior", "text_proj", "decoder", "super_res_first", "super_res_last"):
    got = load_file(tmp_path / f"{name}.safetensors")
    want = {k: v.numpy() for k, v in karlo["torch"][name].state_dict().items()}
    assert sorted(got) == sorted(want), name
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name}: {k}")
  clip = load_file(tmp_path / "clip.safetensors")
  for tower in ("text_encoder", "image_encoder"):
    for k, v in karlo["torch"][tower].state_dict().items():
      np.testing.assert_array_equal(clip[k], v.numpy(), err_msg=k)


def test_scanned_prior_exports_in_the_looped_layout(karlo, loaded, tmp_path):
  """A prior trained with scan_layers=True (stacked blocks) exports the diffusers keys unchanged."""
  from safetensors.numpy import load_file

  cfg, params = loaded["prior"]
  scanned = convert._with_model(mlc.ConfigDict(cfg.to_dict()), scan_layers=True)
  bundle.save_component(tmp_path / "b", "prior", scanned, prior_stage.stack_blocks(params, cfg.model.num_layers))
  code, _, stderr = run_cli("to-safetensors", tmp_path / "b", tmp_path / "st")
  assert code == 0, stderr
  got = load_file(tmp_path / "st" / "prior.safetensors")
  want = karlo["torch"]["prior"].state_dict()
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k].numpy(), err_msg=k)


def test_text_only_clip_exports_with_the_clip_tokenizer(tmp_path):
  """A 49408-token text tower: to-diffusers writes text_encoder + tokenizer (pad "!" = 0, as Karlo's)."""
  from unclip_jax.data import tokenizer as tok_lib

  model = randomize(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      **{**TEXT, "vocab_size": tok_lib.VOCAB_SIZE})), 9)
  model.save_pretrained(tmp_path / "hf")
  assert run_cli("hf-clip", tmp_path / "hf", tmp_path / "b")[0] == 0
  code, stdout, stderr = run_cli("to-diffusers", tmp_path / "b", tmp_path / "d")
  assert code == 0, stderr
  _assert_same_state(transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "d" / "text_encoder"), model,
                     "text_encoder")
  tok = transformers.CLIPTokenizer.from_pretrained(tmp_path / "d" / "tokenizer")
  assert tok.pad_token_id == tok_lib.PAD_ID and tok.model_max_length == L
  ids = tok("a photo of a cat", padding="max_length", max_length=L).input_ids
  want, _ = tok_lib.CLIPTokenizer(context_length=L).tokenize("a photo of a cat")
  assert ids == want[0].tolist()
  slow = transformers.CLIPTokenizer(vocab=str(tmp_path / "d" / "tokenizer" / "vocab.json"),
                                    merges=str(tmp_path / "d" / "tokenizer" / "merges.txt"))
  assert slow("a photo of a cat").input_ids == want[0][:7].tolist()
  index = json.loads((tmp_path / "d" / "model_index.json").read_text())
  assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
  assert index["text_encoder"] == ["transformers", "CLIPTextModelWithProjection"]


def test_karlo_errors_name_the_problem(karlo, tmp_path):
  code, _, err = run_cli("karlo-diffusers", tmp_path / "nope", tmp_path / "b")
  assert code == 1 and "Karlo diffusers folder not found" in err and "nope" in err
  partial = tmp_path / "partial"
  shutil.copytree(karlo["src"], partial, ignore=shutil.ignore_patterns("super_res_last"))
  code, _, err = run_cli("karlo-diffusers", partial, tmp_path / "b")
  assert code == 1 and "missing component folder(s) ['super_res_last']" in err
  assert not (tmp_path / "b").exists(), "nothing is written before every component converted"
  # A state dict with an unexpected (renamed) key fails naming it.
  from safetensors.numpy import load_file, save_file

  bad = tmp_path / "bad"
  shutil.copytree(karlo["src"], bad)
  st = bad / "prior" / "diffusion_pytorch_model.safetensors"
  state = load_file(st)
  state["proj_in.weightx"] = state.pop("proj_in.weight")
  save_file(state, st)
  code, _, err = run_cli("karlo-diffusers", bad, tmp_path / "b")
  assert code == 1 and "proj_in.weightx" in err
  state["proj_in.weight"] = state.pop("proj_in.weightx")[:, :-1]           # mis-shaped
  save_file(state, st)
  code, _, err = run_cli("karlo-diffusers", bad, tmp_path / "b")
  assert code == 1 and "'proj_in.weight'" in err and "shape" in err


def test_hf_clip_full_model(tmp_path):
  cfg = transformers.CLIPConfig(text_config={k: v for k, v in TEXT.items() if k != "projection_dim"},
                                vision_config={k: v for k, v in VISION.items() if k != "projection_dim"},
                                projection_dim=24)
  model = randomize(transformers.CLIPModel(cfg), 8)
  model.save_pretrained(tmp_path / "hf")
  code, stdout, stderr = run_cli("hf-clip", tmp_path / "hf", tmp_path / "b")
  assert code == 0, stderr
  assert "CLIPModel" in stdout
  ccfg, params = bundle.load_component(tmp_path / "b", "clip")
  assert ccfg.model.logit_scale and ccfg.stage == "clip"
  np.testing.assert_allclose(params["logit_scale"], model.logit_scale.item(), rtol=1e-7)
  ids = np.array([[0, 5, 6, 98] + [1] * 12])
  ours = builders.clip(ccfg.model, dtype="float32")
  emb, _ = jax.jit(lambda p, x: ours.apply({"params": p}, x, method=ours.encode_text))(params, jnp.asarray(ids))
  with torch.no_grad():
    close("hf-clip text_embeds", emb, model.get_text_features(input_ids=torch.tensor(ids)).pooler_output.numpy())


def test_karlo_original_layout(loaded, tmp_path):
  """Original-layout .ckpt files (written with the production inverse maps) import to the same params."""
  prior_cfg, prior_params = loaded["prior"]
  dec_cfg, dec_params = loaded["decoder"]
  first_cfg, first = loaded["super_res_first"]
  _, last = loaded["super_res_last"]
  prior_state, stats = convert_prior.params_to_karlo(prior_params, prior_cfg.model)
  wrap = lambda sd: {"state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}}
  torch.save(wrap(prior_state), tmp_path / "prior.ckpt")
  torch.save(tuple(torch.from_numpy(s) for s in stats), tmp_path / "stats.th")
  torch.save(wrap(convert_unet.params_to_karlo_decoder(dec_params["unet"], dec_params["text_proj"], dec_cfg.model,
                                                       dec_cfg.model)), tmp_path / "decoder.ckpt")
  torch.save(wrap(convert_unet.params_to_karlo_sr(first, last, first_cfg.model)), tmp_path / "sr.ckpt")
  code, stdout, stderr = run_cli("karlo-original", tmp_path / "b", "--prior", tmp_path / "prior.ckpt",
                                 "--clip-stats", tmp_path / "stats.th", "--decoder", tmp_path / "decoder.ckpt",
                                 "--sr", tmp_path / "sr.ckpt", "--prior-config", "prior.py:tiny",
                                 "--decoder-config", "decoder.py:tiny", "--sr-config", "upsampler.py:tiny")
  assert code == 0, stderr
  assert "super_res_last" in stdout
  n_qkv = len(prior_state)
  assert f"prior{'':<13}{n_qkv:>14}" in stdout          # fused c_qkv: fewer torch tensors than ours
  for name in ("prior", "decoder", "super_res_first", "super_res_last"):
    want = loaded[name][1]
    got = bundle.load_component(tmp_path / "b", name)[1]
    jax.tree.map(np.testing.assert_array_equal, got, want)
  code, _, err = run_cli("karlo-original", tmp_path / "c", "--prior", tmp_path / "prior.ckpt",
                         "--prior-config", "prior.py:tiny")
  assert code == 1 and "no CLIP statistics" in err
  code, _, err = run_cli("karlo-original", tmp_path / "c", "--decoder", tmp_path / "missing.ckpt")
  assert code == 1 and "missing.ckpt" in err


def test_glide_checkpoint(loaded, tmp_path):
  """A GLIDE-layout state dict (trunk from the tiny decoder, random text encoder) -> decoder component, sizes
  inferred from shapes; to-safetensors gives the GLIDE keys back exactly."""
  _, dec_params = loaded["decoder"]
  cfg = convert.stage_config("decoder.py:tiny")
  cfg = convert._with_model(cfg, text_encoder="glide", xf_width=24, xf_heads=4, text_ctx=8, n_vocab=50, xf_layers=2)
  text_model = builders.glide_text(cfg.model, dtype="float32")
  text_params = builders.init_glide_text(text_model, jax.random.key(0))
  leaves, tree = jax.tree.flatten(text_params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  text_params = jax.tree.unflatten(tree, [np.asarray(0.2 * jax.random.normal(k, x.shape))
                                          for k, x in zip(keys, leaves)])
  state = convert_glide_text.params_to_glide(dec_params["unet"], text_params, cfg.model)
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, tmp_path / "base.pt")
  code, stdout, stderr = run_cli("glide", tmp_path / "base.pt", tmp_path / "b", "--head-dim", 8, "--text-heads", 4,
                                 "--norm-groups", 8)
  assert code == 0, stderr
  got_cfg, got = bundle.load_component(tmp_path / "b", "decoder")
  assert got_cfg.model.text_encoder == "glide" and got_cfg.model.attention_levels == (False, True, True)
  assert (got_cfg.model.layers_per_block, got_cfg.model.cross_attention_dim, got_cfg.model.xf_layers) == (2, 24, 2)
  jax.tree.map(np.testing.assert_array_equal, got, {"unet": dec_params["unet"], "text_encoder": text_params})
  code, _, stderr = run_cli("to-safetensors", tmp_path / "b", tmp_path / "st")
  assert code == 0, stderr
  from safetensors.numpy import load_file

  back = load_file(tmp_path / "st" / "decoder.safetensors")
  assert sorted(back) == sorted(state)
  for k in state:
    np.testing.assert_array_equal(back[k], state[k], err_msg=k)
  code, _, err = run_cli("to-diffusers", tmp_path / "b", tmp_path / "d")
  assert code == 1 and "GLIDE text encoder" in err


def test_from_training_subcommand_errors(tmp_path):
  code, _, err = run_cli("from-training", tmp_path / "b", "--workdir", tmp_path / "nowhere", "--component", "prior")
  assert code == 1 and "nowhere" in err


@pytest.mark.slow
def test_cli_subprocess(karlo, tmp_path):
  root = pathlib.Path(__file__).resolve().parent.parent
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "unclip_jax.convert", "to-safetensors", str(karlo["out"]),
                        str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=root, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "super_res_last" in out.stdout and (tmp_path / "prior.safetensors").is_file()
  bad = subprocess.run([sys.executable, "-m", "unclip_jax.convert", "to-diffusers", str(tmp_path / "none"),
                        str(tmp_path / "x")], capture_output=True, text=True, timeout=300, cwd=root, env=env)
  assert bad.returncode == 1 and "bundle not found" in bad.stderr
