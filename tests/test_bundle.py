"""unclip_jax.bundle: component round trips (fp32 exact, bf16/fp16 to float32), tree checks naming the bad key,
atomic writes, corrupt files, the manifest, and export of EMA params from a real training run."""
import json
import os

import jax
import ml_collections as mlc
import numpy as np
import pytest

import unclip_jax
from unclip_jax import bundle, config_lib
from unclip_jax.ckpt import integrity


def tiny(stage, *overrides):
  return config_lib.load_config(f"configs/{stage}.py:tiny", list(overrides))


def random_params(cfg, seed=0):
  """Every leaf ~ N(0, 0.2²), shaped like the model built from `cfg`."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), bundle.abstract_params(cfg))


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def prior():
  cfg = tiny("prior")
  return cfg, random_params(cfg)


def test_float32_round_trip_is_exact(prior, tmp_path):
  cfg, params = prior
  folder = bundle.save_component(tmp_path, "prior", cfg, params)
  assert folder == tmp_path / "prior"
  assert sorted(p.name for p in folder.iterdir()) == ["config.json", "params.safetensors"]
  from safetensors.numpy import load_file

  flat = load_file(folder / "params.safetensors")
  assert "transformer_blocks_0/attn1/to_q/kernel" in flat and all(v.dtype == np.float32 for v in flat.values())
  got_cfg, got = bundle.load_component(tmp_path, "prior")
  assert_trees_equal(got, params)
  assert got_cfg.to_dict() == mlc.ConfigDict(cfg.to_dict()).to_dict()       # tuples stay tuples
  assert got_cfg.model.num_layers == 2 and got_cfg.axis_rules == cfg.axis_rules
  assert bundle.list_components(tmp_path) == ["prior"]
  m = bundle.read_manifest(tmp_path)
  assert sorted(m.pop("files")) == ["prior/config.json", "prior/params.safetensors"]
  assert m == {"format": "unclip_jax.bundle", "schema": 1, "unclip_jax": unclip_jax.__version__,
               "components": ["prior"], "source": ""}


def test_decoder_component_holds_unet_and_text_proj(tmp_path):
  cfg = tiny("decoder")
  params = random_params(cfg, 1)
  assert sorted(params) == ["text_proj", "unet"]
  bundle.save_component(tmp_path, "decoder", cfg, params, dtype="bfloat16")
  size16 = (tmp_path / "decoder" / "params.safetensors").stat().st_size
  _, got = bundle.load_component(tmp_path, "decoder")
  leaves = jax.tree.leaves(got)
  assert all(x.dtype == np.float32 for x in leaves)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2 ** -8, atol=0), got, params)
  assert any(np.any(g != w) for g, w in zip(leaves, jax.tree.leaves(params))), "bf16 rounds some values"
  bundle.save_component(tmp_path, "decoder", cfg, params)
  assert size16 < 0.55 * (tmp_path / "decoder" / "params.safetensors").stat().st_size


def test_float16_storage(prior, tmp_path):
  cfg, params = prior
  bundle.save_component(tmp_path, "prior", cfg, params, dtype="float16")
  _, got = bundle.load_component(tmp_path, "prior")
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2 ** -11, atol=2 ** -24), got, params)
  with pytest.raises(ValueError, match="dtype must be one of"):
    bundle.save_component(tmp_path, "prior", cfg, params, dtype="int8")


def test_names_and_stages_are_checked(prior, tmp_path):
  cfg, params = prior
  with pytest.raises(ValueError, match="unknown bundle component 'vae'"):
    bundle.save_component(tmp_path, "vae", cfg, params)
  with pytest.raises(ValueError, match="component 'decoder' needs a 'decoder' stage config, got stage 'prior'"):
    bundle.save_component(tmp_path, "decoder", cfg, params)
  with pytest.raises(ValueError, match="unknown bundle component"):
    bundle.load_component(tmp_path, "unet")


def test_params_are_checked_against_the_model_before_writing(prior, tmp_path):
  cfg, params = prior
  extra = {**params, "bogus": np.zeros(3, np.float32)}
  with pytest.raises(ValueError, match="unexpected parameter 'bogus'"):
    bundle.save_component(tmp_path, "prior", cfg, extra)
  bad = jax.tree.map(lambda x: x, params)
  bad["proj_in"]["kernel"] = bad["proj_in"]["kernel"][:, :-1]
  with pytest.raises(ValueError, match=r"'proj_in/kernel' has shape \(32, 23\), the model expects \(32, 24\)"):
    bundle.save_component(tmp_path, "prior", cfg, bad)
  missing = {k: v for k, v in params.items() if k != "prd_embedding"}
  with pytest.raises(ValueError, match="missing parameter 'prd_embedding'"):
    bundle.save_component(tmp_path, "prior", cfg, missing)
  assert not (tmp_path / "prior").exists() and bundle.list_components(tmp_path) == []


def test_load_errors_name_the_file(prior, tmp_path):
  cfg, params = prior
  with pytest.raises(FileNotFoundError, match="bundle component folder not found: .*nowhere/prior"):
    bundle.load_component(tmp_path / "nowhere", "prior")
  bundle.save_component(tmp_path, "prior", cfg, params)
  folder = tmp_path / "prior"
  st = folder / "params.safetensors"
  data = st.read_bytes()
  st.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="corrupt params file .*prior/params.safetensors"):
    bundle.load_component(tmp_path, "prior", verify=False)         # what the reader says without the record
  st.unlink()
  with pytest.raises(FileNotFoundError, match="component params not found: .*prior/params.safetensors"):
    bundle.load_component(tmp_path, "prior")
  st.write_bytes(data)
  (folder / "config.json").write_text('{"stage": "prior", "model": ')
  with pytest.raises(ValueError, match="corrupt component config .*prior/config.json"):
    bundle.load_component(tmp_path, "prior", verify=False)
  (folder / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="component config not found: .*prior/config.json"):
    bundle.load_component(tmp_path, "prior")
  # A config whose model no longer matches the stored params: the first bad key is named.
  d = config_lib.to_dict(cfg)
  d["model"]["num_layers"] = 1
  (folder / "config.json").write_text(json.dumps(d))
  with pytest.raises(ValueError, match="params.safetensors: unexpected parameter 'transformer_blocks_1/attn1/to_k/"):
    bundle.load_component(tmp_path, "prior", verify=False)
  d["model"]["num_layers"], d["stage"] = 2, "decoder"
  (folder / "config.json").write_text(json.dumps(d))
  with pytest.raises(ValueError, match="component 'prior' needs stage 'prior', got 'decoder'"):
    bundle.load_component(tmp_path, "prior", verify=False)


def test_interrupted_writes_never_leave_a_half_component(prior, tmp_path, monkeypatch):
  import safetensors.numpy

  cfg, params = prior
  real_save = safetensors.numpy.save_file

  def crash(tensors, path, metadata=None):
    with open(path, "wb") as f:
      f.write(b"\x00" * 100)                     # half-written file, then the process "dies"
    raise KeyboardInterrupt

  monkeypatch.setattr(safetensors.numpy, "save_file", crash)
  with pytest.raises(KeyboardInterrupt):
    bundle.save_component(tmp_path, "prior", cfg, params)
  assert not (tmp_path / "prior").exists() and os.listdir(tmp_path) == []
  monkeypatch.setattr(safetensors.numpy, "save_file", real_save)
  bundle.save_component(tmp_path, "prior", cfg, params)
  newer = jax.tree.map(lambda x: x + 1.0, params)
  monkeypatch.setattr(safetensors.numpy, "save_file", crash)
  with pytest.raises(KeyboardInterrupt):
    bundle.save_component(tmp_path, "prior", cfg, newer)
  assert sorted(os.listdir(tmp_path)) == ["bundle.json", "prior"]        # no temporary folders left
  assert_trees_equal(bundle.load_component(tmp_path, "prior")[1], params)  # the old component, whole
  monkeypatch.setattr(safetensors.numpy, "save_file", real_save)
  bundle.save_component(tmp_path, "prior", cfg, newer)                    # replacing works
  assert_trees_equal(bundle.load_component(tmp_path, "prior")[1], newer)
  assert sorted(os.listdir(tmp_path)) == ["bundle.json", "prior"]


def test_manifest_checks(prior, tmp_path):
  with pytest.raises(FileNotFoundError, match="bundle folder not found"):
    bundle.read_manifest(tmp_path / "none")
  with pytest.raises(FileNotFoundError, match="bundle manifest not found: .*bundle.json"):
    bundle.read_manifest(tmp_path)
  cfg, params = prior
  bundle.save_component(tmp_path, "prior", cfg, params)
  m = bundle.write_manifest(tmp_path, source="test")
  assert bundle.read_manifest(tmp_path) == m and m["source"] == "test"
  bundle.save_component(tmp_path, "prior", cfg, params)
  assert bundle.read_manifest(tmp_path)["source"] == "test"                # kept across component writes
  path = tmp_path / "bundle.json"
  path.write_text(json.dumps({**m, "schema": 2}))
  with pytest.raises(ValueError, match="bundle schema 2 is not readable"):
    bundle.read_manifest(tmp_path)
  path.write_text(json.dumps({**m, "format": "something.else"}))
  with pytest.raises(ValueError, match="not an unclip_jax bundle manifest"):
    bundle.read_manifest(tmp_path)
  path.write_text(json.dumps({**m, "components": ["prior", "decoder"]}))
  with pytest.raises(FileNotFoundError, match="lists component 'decoder'"):
    bundle.read_manifest(tmp_path)
  path.write_text("{not json")
  with pytest.raises(ValueError, match="corrupt bundle manifest"):
    bundle.read_manifest(tmp_path)


# ---- integrity records --------------------------------------------------------------------------------------------
def _damage(path, how):
  data = bytearray(path.read_bytes())
  if how == "bytes":                               # 4 KiB of random bytes in the middle (the tensor data)
    n = min(4096, len(data) // 2)
    start = len(data) // 2 - n // 2
    data[start:start + n] = np.random.default_rng(0).bytes(n)
  elif how == "truncate":
    data = data[: len(data) - 100]
  path.write_bytes(bytes(data))


def test_manifest_records_every_file_and_load_verifies(prior, tmp_path):
  cfg, params = prior
  bundle.save_component(tmp_path, "prior", cfg, params)
  files = bundle.read_manifest(tmp_path)["files"]
  assert sorted(files) == ["prior/config.json", "prior/params.safetensors"]
  st = tmp_path / "prior" / "params.safetensors"
  assert files["prior/params.safetensors"]["size"] == st.stat().st_size
  assert files["prior/params.safetensors"] == integrity.file_digest(st)
  assert bundle.verify_bundle(tmp_path) == ["prior"]
  assert_trees_equal(bundle.load_component(tmp_path, "prior")[1], params)
  bundle.write_manifest(tmp_path, source="again")                         # a rewrite keeps the record
  assert bundle.read_manifest(tmp_path)["files"] == files


@pytest.mark.parametrize("target,how", [("params.safetensors", "bytes"), ("params.safetensors", "truncate"),
                                        ("config.json", "bytes")])
def test_damaged_bundle_is_a_clear_error_unless_skipped(prior, tmp_path, target, how):
  cfg, params = prior
  bundle.save_component(tmp_path, "prior", cfg, params)
  _damage(tmp_path / "prior" / target, how)
  problem = "sha256 mismatch" if how == "bytes" else "truncated"
  with pytest.raises(integrity.IntegrityError,
                     match=f"bundle component 'prior' in .* is damaged: prior/{target}: {problem}.*--no-verify"):
    bundle.load_component(tmp_path, "prior")
  with pytest.raises(ValueError, match=f"prior/{target}: {problem}"):        # what the sample CLI prints
    bundle.verify_bundle(tmp_path)
  if target == "params.safetensors" and how == "bytes":                     # skipped: it loads, damaged
    loaded = bundle.load_component(tmp_path, "prior", verify=False)[1]
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)))


def test_deleted_bundle_file_names_it(prior, tmp_path):
  cfg, params = prior
  bundle.save_component(tmp_path, "prior", cfg, params)
  (tmp_path / "prior" / "params.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="component params not found: .*prior/params.safetensors"):
    bundle.load_component(tmp_path, "prior")
  (tmp_path / "bundle.json").write_text("{not json")
  with pytest.raises(ValueError, match="corrupt bundle manifest"):            # a damaged record is not skipped
    bundle.verify_component(tmp_path, "prior")


def test_bundle_without_record_loads_with_a_note(prior, tmp_path, caplog):
  cfg, params = prior
  bundle.save_component(tmp_path, "prior", cfg, params)
  m = bundle.read_manifest(tmp_path)
  del m["files"]
  (tmp_path / "bundle.json").write_text(json.dumps(m))                     # as written before the record existed
  with caplog.at_level("INFO", logger=bundle.__name__):
    assert_trees_equal(bundle.load_component(tmp_path, "prior")[1], params)
  notes = [r.getMessage() for r in caplog.records if "no integrity record" in r.getMessage()]
  assert len(notes) == 1 and "'prior'" in notes[0]
  (tmp_path / "bundle.json").unlink()
  assert bundle.verify_component(tmp_path, "prior") is False               # no manifest at all: nothing to check


def test_embedded_bundle_is_verified():
  from unclip_jax import sample

  assert bundle.verify_bundle(sample.DEFAULT_BUNDLE) == ["clip", "prior", "decoder", "super_res_first"]


def test_sample_cli_verifies_unless_no_verify(tmp_path, monkeypatch, capsys):
  import shutil

  from unclip_jax import sample
  from unclip_jax.inference import pipeline

  with pytest.raises(SystemExit):
    sample.parse_args(["generate", "--help"])
  assert "--no-verify" in capsys.readouterr().out
  # A damaged copy of the embedded bundle: the CLI stops with an error naming the file, before sampling.
  damaged = tmp_path / "bundle"
  shutil.copytree(sample.DEFAULT_BUNDLE, damaged)
  _damage(damaged / "prior" / "params.safetensors", "bytes")
  assert sample.main(["--prompt", "x", "--out", str(tmp_path / "o"), "--bundle", str(damaged)]) == 2
  err = capsys.readouterr().err
  assert "error: bundle component 'prior' in" in err and "prior/params.safetensors: sha256 mismatch" in err
  assert not (tmp_path / "o").exists()
  # --no-verify reaches the loader as verify=False (the pipeline itself is not run here).
  seen = []

  def from_bundle(cls, path, **kwargs):
    seen.append(kwargs["verify"])
    raise ValueError("stop here")

  monkeypatch.setattr(pipeline.UnCLIP, "from_bundle", classmethod(from_bundle))
  for flags in (["--no-verify"], []):
    assert sample.main(["--prompt", "x", "--out", str(tmp_path / "o"), "--bundle", str(damaged), *flags]) == 2
  assert seen == [False, True]


# ---- export from a real training run ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_prior(tmp_path_factory):
  from unclip_jax import stages
  from unclip_jax.data import builders
  from unclip_jax.train import loop

  root = tmp_path_factory.mktemp("train")
  rng = np.random.default_rng(0)
  n, e, length = 16, 32, 16
  mask = np.arange(length)[None, :] < rng.integers(3, length, (n, 1))
  emb = builders.build_embeddings(
      {"image_emb": rng.standard_normal((n, e)).astype(np.float32),
       "text_emb": rng.standard_normal((n, e)).astype(np.float32),
       "text_enc": rng.standard_normal((n, length, e)).astype(np.float32), "text_mask": mask}, root, "emb")
  cfg = tiny("prior", f"data.dirs={(str(emb),)!r}", "num_train_steps=2", "log_every=1", "ckpt_every=2",
             "dtype='float32'", "batch_size=8", "mesh.data=4", "mesh.fsdp=2", "optim.warmup_steps=0",
             "optim.ema_decay=0.5", "stats_examples=8")
  mesh = loop.mesh_lib.make_mesh(dict(cfg.mesh))
  workdir = root / "run"
  state = loop.train(cfg, workdir, stages.make_task(cfg, mesh=mesh), mesh=mesh)
  return cfg, workdir, jax.device_get(state)


def test_export_from_training_takes_the_ema_params(trained_prior, tmp_path):
  cfg, workdir, state = trained_prior
  out_cfg, out = bundle.export_from_training(workdir, tmp_path, "prior")
  assert out_cfg.stage == "prior" and out_cfg.num_train_steps == 2
  got_cfg, got = bundle.load_component(tmp_path, "prior")
  assert_trees_equal(got, jax.tree.map(np.asarray, state.ema_params))
  assert any(np.any(g != np.asarray(p)) for g, p in zip(jax.tree.leaves(got), jax.tree.leaves(state.params))), \
      "EMA params, not the raw params"
  assert got_cfg.to_dict() == mlc.ConfigDict(cfg.to_dict()).to_dict()
  assert bundle.read_manifest(tmp_path)["source"] == f"prior: training:{workdir}@2"
  bundle.export_from_training(workdir, tmp_path, "prior", step=2)          # re-exported: its entry is replaced
  assert bundle.read_manifest(tmp_path)["source"] == f"prior: training:{workdir}@2"


def test_export_from_training_errors(trained_prior, tmp_path):
  _, workdir, _ = trained_prior
  with pytest.raises(ValueError, match="trained stage 'prior'; component 'decoder' needs a 'decoder' run"):
    bundle.export_from_training(workdir, tmp_path, "decoder")
  with pytest.raises(FileNotFoundError, match="no training checkpoints at .*missing"):
    bundle.export_from_training(tmp_path / "missing", tmp_path, "prior")
  with pytest.raises(FileNotFoundError, match="no checkpoint for step 7"):
    bundle.export_from_training(workdir, tmp_path, "prior", step=7)
  from unclip_jax.convert import cli as convert

  code = convert.main(["from-training", str(tmp_path / "b"), "--workdir", str(workdir), "--component", "prior"])
  assert code == 0 and bundle.list_components(tmp_path / "b") == ["prior"]
