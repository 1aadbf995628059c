"""The text-to-image pipeline, the manipulations and the sample CLI on a random tiny bundle."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from helpers import build_tiny_bundle
from unclip_jax import bundle, sample
from unclip_jax.inference import manipulations as M
from unclip_jax.inference.images import from_uint8
from unclip_jax.inference.pipeline import UnCLIP


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
  return build_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def pipe(bundle_dir):
  return UnCLIP.from_bundle(bundle_dir)


def _image(seed, size=40):
  return (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)


def test_generate_order_determinism_and_reranking(pipe):
  prompts = ["a red circle", "a blue square on a green background"]
  g = pipe.generate(prompts, seed=0, images_per_prompt=2, batch_size=3)
  assert g.images.shape == (4, 32, 32, 3) and g.images.dtype == np.uint8
  assert g.prompt_index == [0, 0, 1, 1] and g.clip_scores == [None] * 4
  again = pipe.generate(prompts, seed=0, images_per_prompt=2, batch_size=3)
  np.testing.assert_array_equal(g.images, again.images)
  assert (g.images[0] != g.images[1]).mean() > 0.5        # two images of one prompt differ
  other = pipe.generate(prompts, seed=1, images_per_prompt=2, batch_size=3)
  assert (other.images != g.images).mean() > 0.5
  ranked = pipe.generate(prompts[:1], seed=0, candidates=3, batch_size=3)
  all3 = pipe.generate(prompts[:1], seed=0, images_per_prompt=3, batch_size=3)   # the same three draws
  emb = np.asarray(pipe.encode_image(list(all3.images)))
  text = np.asarray(pipe.encode_text(prompts[:1]).emb)[0]
  cos = emb @ text / np.linalg.norm(emb, axis=1) / np.linalg.norm(text)
  np.testing.assert_array_equal(ranked.images[0], all3.images[int(np.argmax(cos))])
  assert ranked.clip_scores[0] == pytest.approx(100 * cos.max(), rel=1e-4)


def test_stage_outputs_and_overrides(pipe):
  text = pipe.encode_text(["x", "y"])
  z = pipe.sample_prior(text, jax.random.key(0))
  assert z.shape == (2, 32) and np.isfinite(np.asarray(z)).all()
  low = pipe.decode(z, text, jax.random.key(1))
  assert low.shape == (2, 16, 16, 3) and float(jnp.abs(low).max()) <= 1.0
  assert pipe.upsample(low, jax.random.key(2)).shape == (2, 32, 32, 3)
  fast = pipe.with_sampling(decoder={"steps": "2", "guidance_scale": 1.0})
  assert fast.settings()["decoder"]["steps"] == "2" and pipe.settings()["decoder"]["steps"] == "5"
  assert fast is pipe.with_sampling(decoder={"guidance_scale": 1.0, "steps": "2"})   # cached
  with pytest.raises(KeyError, match="unknown decoder sampling setting 'stepz'"):
    pipe.with_sampling(decoder={"stepz": 3})
  with pytest.raises(KeyError, match="unknown sampling stage"):
    pipe.with_sampling(upsampler={"steps": 3})


def test_bad_inputs(pipe, bundle_dir, tmp_path):
  with pytest.raises(ValueError, match="no prompts"):
    pipe.generate([])
  with pytest.raises(ValueError, match="candidates must be >= 1"):
    pipe.generate(["a"], candidates=0)
  with pytest.raises(FileNotFoundError, match="model bundle not found"):
    UnCLIP.from_bundle(tmp_path / "nope")
  partial = tmp_path / "partial"
  bundle.save_component(partial, "clip", *bundle.load_component(bundle_dir, "clip"))
  with pytest.raises(FileNotFoundError, match=r"lacks component\(s\) \['prior', 'decoder'\]"):
    UnCLIP.from_bundle(partial)
  with pytest.raises(ValueError, match=r"mask must be \[H, W\] = \(40, 40\)"):
    M.inpaint(pipe, _image(0), np.ones((20, 40)), "a")


def test_slerp():
  a, b = jnp.array([3.0, 0.0]), jnp.array([0.0, 1.0])
  out = np.asarray(M.slerp(a, b, jnp.array([0.0, 0.5, 1.0])))
  np.testing.assert_allclose(out[0], a, atol=1e-6)
  np.testing.assert_allclose(out[2], b, atol=1e-6)
  np.testing.assert_allclose(out[1], 2.0 * np.array([1, 1]) / np.sqrt(2), atol=1e-6)   # 45°, mean norm
  np.testing.assert_allclose(np.asarray(M.slerp(a, 2 * a, 0.5)), 1.5 * np.asarray(a), atol=1e-6)  # parallel


def test_manipulations_are_consistent(tmp_path):
  """Without the (stochastic) upsampler, η = 0 decoding is deterministic, so frames can be compared row by row."""
  pipe = UnCLIP.from_bundle(build_tiny_bundle(tmp_path / "no_sr", super_res=False))
  a, b = _image(1), _image(2)
  frames = M.interpolate(pipe, a, b, 3)
  assert frames.shape == (3, 16, 16, 3)
  recon_a = M.variations(pipe, a, 1, eta=0.0)                 # η = 0 from a's own (z_i, x_T)
  recon_b = M.variations(pipe, b, 1, eta=0.0)
  # θ = 0 and θ = 1 are the two images' own latents (equal up to float rounding across batch sizes)
  same = lambda x, y: np.testing.assert_allclose(x.astype(int), y.astype(int), atol=3)
  same(frames[0], recon_a[0])
  same(frames[-1], recon_b[0])
  diff = M.text_diff(pipe, a, "a red circle", "a blue square", 3)
  same(diff[0], recon_a[0])                                    # θ = 0 leaves the embedding alone
  assert diff.shape == (3, 16, 16, 3)
  # (random weights: DDIM-inverted latents of an untrained decoder are huge, so decoded frames saturate and
  # further frame-to-frame differences are not a meaningful check here)
  vars_ = M.variations(pipe, a, 3, eta=1.0)
  assert (vars_[0] != vars_[1]).mean() > 0.5                   # η > 0: different variations
  assert M.interpolate(pipe, a, b, 3, latent="fixed").shape == frames.shape


def test_inpaint_keeps_the_known_region(pipe):
  image = _image(4)
  mask = np.zeros((40, 40), bool)
  mask[:, :20] = True
  out = M.inpaint(pipe, image, mask, "a red circle", n=2)
  known = M.resize(image, 32)
  np.testing.assert_array_equal(out[:, :, :16], np.repeat(known[None, :, :16], 2, 0))
  raw = M.inpaint(pipe, image, mask, "a red circle", n=2, paste=False)
  assert raw.shape == out.shape and (raw[:, :, 16:] == out[:, :, 16:]).all()


def test_inpainting_settings_are_sampling_settings(pipe, bundle_dir, tmp_path):
  """`sampling.inpaint_method` / `resample_jumps` are declared settings: overridable like any other (they raised
  KeyError before), from the API and from the CLI's inpaint flags, and they change the result."""
  image = _image(4)
  mask = np.zeros((40, 40), bool)
  mask[:, :20] = True
  jumps = pipe.with_sampling(decoder={"inpaint_method": "repaint", "resample_jumps": 2})
  settings = jumps.settings()["decoder"]
  assert settings["resample_jumps"] == 2 and settings["inpaint_method"] == "repaint"
  one = M.inpaint(pipe, image, mask, "a red circle", n=1, paste=False)
  two = M.inpaint(jumps, image, mask, "a red circle", n=1, paste=False)
  assert not np.array_equal(one, two)
  loaded = UnCLIP.from_bundle(bundle_dir, sampling={"decoder": {"inpaint_method": "repaint", "resample_jumps": 3}})
  assert loaded.settings()["decoder"]["resample_jumps"] == 3
  args = sample.parse_args(["inpaint", "--image", "a.png", "--mask", "m.png", "--prompt", "x", "--out", "o",
                            "--inpaint-method", "repaint", "--resample-jumps", "2"])
  assert sample.sampling_overrides(args) == {"decoder": {"inpaint_method": "repaint", "resample_jumps": 2}}


def test_cli_writes_ordered_pngs_grid_and_settings(bundle_dir, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red circle\n\na blue square\na green triangle\n")
  rc = sample.main(["--prompts-file", str(prompts), "--out", str(tmp_path / "out"), "--bundle", str(bundle_dir),
                    "--seed", "0", "--decoder-steps", "3", "--prior-guidance", "2.5", "--batch-size", "2",
                    "--no-progress"])
  assert rc == 0
  names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
  assert names == ["0000.png", "0001.png", "0002.png", "grid.png"]
  meta = json.loads((tmp_path / "out" / "0002.json").read_text())
  assert meta["prompt"] == "a green triangle" and meta["seed"] == 0
  assert meta["settings"]["decoder"]["steps"] == "3" and meta["settings"]["prior"]["guidance_scale"] == 2.5
  assert Image.open(tmp_path / "out" / "0000.png").size == (32, 32)
  assert Image.open(tmp_path / "out" / "grid.png").size == (64, 64)
  # the same command through the python API gives the same pixels
  pipe = UnCLIP.from_bundle(bundle_dir, sampling={"decoder": {"steps": "3"}, "prior": {"guidance_scale": 2.5}})
  want = pipe.generate(["a red circle", "a blue square", "a green triangle"], seed=0, batch_size=2).images
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "0001.png")), want[1])


def test_cli_bad_inputs_fail_before_compute(bundle_dir, tmp_path, capsys):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n")
  out = str(tmp_path / "o")
  assert sample.main(["--prompts-file", str(empty), "--out", out, "--bundle", str(bundle_dir)]) == 2
  assert "no prompts in" in capsys.readouterr().err
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"not a png")
  assert sample.main(["variations", "--image", str(bad), "--out", out, "--bundle", str(bundle_dir)]) == 2
  assert "cannot read image" in capsys.readouterr().err
  Image.fromarray(_image(0)).save(tmp_path / "img.png")
  Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "mask.png")
  assert sample.main(["inpaint", "--image", str(tmp_path / "img.png"), "--mask", str(tmp_path / "mask.png"),
                      "--prompt", "x", "--out", out, "--bundle", str(bundle_dir)]) == 2
  assert "is 10x10 but the image is 40x40" in capsys.readouterr().err
  assert sample.main(["--prompt", "x", "--out", out, "--bundle", str(tmp_path / "missing")]) == 2
  assert "model bundle not found" in capsys.readouterr().err
  assert sample.main(["--prompt", "x", "--out", out, "--bundle", str(bundle_dir), "--decoder-steps", "0"]) == 2
  assert not (tmp_path / "o").exists()


def test_compilation_cache_folder_resolution(monkeypatch, tmp_path):
  from unclip_jax import compilation_cache as cc

  monkeypatch.delenv("UNCLIP_JAX_CACHE", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert cc.default_dir() == tmp_path / "xdg" / "unclip_jax" / "xla"
  assert cc.resolve(None, cc.default_dir()) == tmp_path / "xdg" / "unclip_jax" / "xla"
  assert cc.resolve(None) is None                                      # train: no cache unless asked
  monkeypatch.setenv("UNCLIP_JAX_CACHE", str(tmp_path / "env"))
  assert cc.resolve(None, cc.default_dir()) == tmp_path / "env"
  assert cc.resolve(str(tmp_path / "flag")) == tmp_path / "flag"
  assert cc.resolve("") is None
  monkeypatch.setenv("UNCLIP_JAX_CACHE", "")
  assert cc.resolve(None, cc.default_dir()) is None


@pytest.mark.slow
def test_cli_fills_the_compilation_cache_it_is_given(bundle_dir, tmp_path):
  """A fresh process (jax sets its cache folder once per process) writes its compiled stages to --compilation-cache;
  '' leaves no folder behind."""
  import os
  import subprocess
  import sys

  def cli(cache):
    env = dict(os.environ, XLA_FLAGS="", UNCLIP_JAX_CACHE=str(tmp_path / "env-cache"))
    proc = subprocess.run([sys.executable, "-m", "unclip_jax.sample", "--prompt", "a red circle", "--out",
                           str(tmp_path / f"out{len(cache)}"), "--bundle", str(bundle_dir), "--no-progress",
                           "--compilation-cache", cache], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

  cli(str(tmp_path / "xla"))
  assert len(list((tmp_path / "xla").iterdir())) >= 2          # at least the decoder and super-res samplers
  cli("")
  assert not (tmp_path / "env-cache").exists()


def test_pipeline_shards_rows_over_devices_and_matches_one_device(bundle_dir, pipe):
  """8 (forced CPU) devices: weights replicated, an 8-row batch sharded by rows, a 3-row one replicated; the images
  equal the one-device pipeline's (the noise is drawn the same way on any mesh)."""
  from unclip_jax.inference.pipeline import StageNoise

  assert jax.device_count() == 8 and pipe.mesh.size == 1           # CPU default: one device
  pipe8 = UnCLIP.from_bundle(bundle_dir, devices=jax.devices())
  assert pipe8.mesh.size == 8 and len(jax.tree.leaves(pipe8.decoder_params)[0].sharding.device_set) == 8
  prompts = ["a red circle", "a blue square", "a green triangle", "a purple circle"] * 2
  noise = StageNoise.from_key(jax.random.key(3))
  one, eight = pipe.run(pipe.encode_text(prompts), noise), pipe8.run(pipe8.encode_text(prompts), noise)
  for name in ("image_emb", "low_res", "images"):
    assert eight[name].sharding.spec == jax.sharding.PartitionSpec("data"), name
    assert len(eight[name].addressable_shards) == 8 and eight[name].addressable_shards[0].data.shape[0] == 1
    np.testing.assert_allclose(np.asarray(eight[name]), np.asarray(one[name]), atol=2e-4, rtol=0, err_msg=name)
  g1 = pipe.generate(prompts[:3], seed=1, batch_size=3)
  g8 = pipe8.generate(prompts[:3], seed=1, batch_size=3)               # 3 rows on 8 devices: replicated
  assert np.abs(g8.images.astype(int) - g1.images.astype(int)).max() <= 1
  with pytest.raises(ValueError, match="at least one device"):
    UnCLIP.from_bundle(bundle_dir, devices=[])
