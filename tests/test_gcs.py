"""gs:// end to end against a local GCS emulator (gcp-storage-emulator on 127.0.0.1, started here, in memory).

The Google clients (gcsfs under etils.epath, google-cloud-storage under tensorboardX) find it through
STORAGE_EMULATOR_HOST, tensorstore (orbax's arrays) through TENSORSTORE_GCS_HTTP_URL. Nothing leaves the machine:
metadata-server lookups are pointed at a closed local port.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

# gcsfs >= 2025 asks GCS's gRPC control plane whether a bucket has a hierarchical namespace before listing it; the
# emulator has no gRPC, so every listing blocked gcsfs's event loop on credential look-ups and gRPC retries (minutes
# per call, never cached) -- the "hang". The plain GCSFileSystem is chosen when gcsfs is imported; the subprocesses
# get the same setting through _env().
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator is not installed (pip install -e .[test])")
pytest.importorskip("gcsfs", reason="gcsfs is not installed (pip install -e .[test])")

from etils import epath  # noqa: E402

from unclip_jax import paths  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
BUCKET = "unclip-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(port: int) -> dict[str, str]:
  url = f"http://127.0.0.1:{port}"
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "NO_GCE_CHECK": "true",
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
          "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9", "GCE_METADATA_ROOT": "127.0.0.1:9",
          "GOOGLE_CLOUD_PROJECT": "test"}


def _clear_gcsfs_cache():
  import gcsfs

  gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The emulator's environment (also set in os.environ for this process while the module runs).

  This process also turns gcsfs's listings cache off: the tests look at objects that subprocesses write, which a
  cached listing would hide.
  """
  import fsspec

  port = _free_port()
  log_path = tmp_path_factory.mktemp("gcs") / "emulator.log"      # a file, not a pipe: it logs every request
  log_file = open(log_path, "wb")
  proc = subprocess.Popen([sys.executable, str(HERE / "gcs_emulator.py"), str(port), BUCKET],
                          stdout=log_file, stderr=subprocess.STDOUT)
  saved_conf = {k: fsspec.config.conf.get(k) for k in ("gs", "gcs")}
  try:
    deadline = time.time() + 30
    while time.time() < deadline:
      try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        break
      except OSError:
        if proc.poll() is not None:
          raise RuntimeError(f"GCS emulator exited: {log_path.read_text()[-3000:]}")
        time.sleep(0.1)
    else:
      raise RuntimeError("GCS emulator did not start in 30 s")
    env = _env(port)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    for k in saved_conf:
      fsspec.config.conf[k] = dict(saved_conf[k] or {}, use_listings_cache=False)
    _clear_gcsfs_cache()
    yield env
  finally:
    proc.kill()
    proc.wait(timeout=10)
    log_file.close()
    if "saved" in locals():
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v
    for k, v in saved_conf.items():
      if v is None:
        fsspec.config.conf.pop(k, None)
      else:
        fsspec.config.conf[k] = v
    _clear_gcsfs_cache()


def _url(*parts: str) -> str:
  return "/".join([f"gs://{BUCKET}", *parts])


# ---- path plumbing (no emulator) ----------------------------------------------------------------------------------
def test_local_paths_stay_pathlib_and_urls_stay_urls(tmp_path):
  assert not paths.is_remote(tmp_path) and not paths.is_remote("rel/dir") and paths.is_remote("gs://b/x")
  assert isinstance(paths.as_path(tmp_path), pathlib.Path)
  assert paths.as_path("rel", absolute=True) == pathlib.Path("rel").absolute()
  p = paths.as_path("gs://b/decoder")
  assert isinstance(p, epath.Path) and str(p / "checkpoints") == "gs://b/decoder/checkpoints"
  with pytest.raises(paths.UnreachablePathError, match="dataset directory .*missing does not exist"):
    paths.check_reachable(tmp_path / "missing", "dataset directory")


# ---- with the emulator --------------------------------------------------------------------------------------------
def test_unreachable_bucket_is_one_clear_error_before_compute(gcs):
  from toy_train_job import make_config, make_task
  from unclip_jax.train import loop

  t0 = time.perf_counter()
  with pytest.raises(paths.UnreachablePathError, match=r"--workdir gs://no-such-bucket/run cannot be written"):
    loop.train(make_config(4), "gs://no-such-bucket/run", make_task())
  assert time.perf_counter() - t0 < 30
  with pytest.raises(paths.UnreachablePathError, match=r"dataset directory gs://no-such-bucket/data"):
    from unclip_jax.data import pipeline

    pipeline.resolve_dataset_dir("gs://no-such-bucket/data")


# Training against the bucket runs in subprocesses, as the CLI does: in the pytest process orbax's background
# save thread deadlocked in gcsfs's event loop (a mkdir through fsspec's sync wrapper never returned), which a
# fresh process does not.
def _run_job(args, env):
  return subprocess.Popen([sys.executable, str(HERE / "toy_train_job.py"), *map(str, args)],
                          env=dict(os.environ, **env, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)


def _finish(proc, timeout=300):
  """Waits for a job (killed after `timeout` s: a hang fails the test instead of blocking CI); returns its log."""
  try:
    out = proc.communicate(timeout=timeout)[0].decode(errors="replace")
  except subprocess.TimeoutExpired:
    proc.kill()
    out = proc.communicate()[0].decode(errors="replace")
    raise AssertionError(f"job did not finish in {timeout} s:\n{out[-4000:]}") from None
  assert proc.returncode == 0, out[-4000:]
  return out


def _assert_same(ref_npz, got_npz, steps):
  ref, got = np.load(ref_npz), np.load(got_npz)
  assert int(got["step"]) == steps
  for key in ref.files:
    np.testing.assert_array_equal(got[key], ref[key], err_msg=key)


@pytest.mark.slow
def test_sigkill_in_bucket_then_resume_matches_uninterrupted_run(gcs, tmp_path):
  steps = 30
  reference = _run_job([tmp_path / "ref", steps, tmp_path / "ref.npz"], gcs)
  run = _url("killed")
  victim = _run_job([run, steps, tmp_path / "run.npz", "--sleep", "0.3"], gcs)
  ckpts = epath.Path(run) / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline:
    seen = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.exists() else []
    if seen and max(seen) >= 10 and (ckpts / str(max(seen)) / "commit_success.txt").exists():
      break
    assert victim.poll() is None, victim.communicate()[0].decode()[-3000:]
    time.sleep(0.2)
  else:
    victim.kill()
    raise AssertionError("no checkpoint appeared in the bucket in time")
  victim.send_signal(signal.SIGKILL)
  victim.wait(timeout=60)
  assert not (tmp_path / "run.npz").exists(), "the job was killed before finishing"
  assert not pathlib.Path("gs:").exists(), "a URL must never become a local folder"
  _finish(reference)
  _finish(_run_job([run, steps, tmp_path / "run.npz"], gcs))
  _assert_same(tmp_path / "ref.npz", tmp_path / "run.npz", steps)
  root = epath.Path(run)
  assert (root / "checkpoints" / str(steps) / "integrity.json").is_file()
  assert list((root / "tensorboard").iterdir()), "TensorBoard events go to the bucket"


@pytest.mark.slow
def test_damaged_step_in_bucket_is_moved_aside_and_resume_falls_back(gcs, tmp_path):
  reference = _run_job([tmp_path / "ref", 12, tmp_path / "ref.npz"], gcs)
  run = _url("damaged_run")
  _finish(_run_job([run, 12, tmp_path / "first.npz", "--max-steps", 10], gcs))    # checkpoints 5 and 10
  step10 = epath.Path(run) / "checkpoints" / "10"
  record = json.loads((step10 / "integrity.json").read_text())
  victim = sorted(f for f in record["files"] if f.startswith("state/"))[0]
  (step10 / victim).write_bytes(b"garbage")
  out = _finish(_run_job([run, 12, tmp_path / "run.npz"], gcs))
  assert "checkpoint step 10 is damaged" in out
  _finish(reference)
  _assert_same(tmp_path / "ref.npz", tmp_path / "run.npz", 12)
  damaged = list((epath.Path(run) / "checkpoints" / "damaged").iterdir())
  assert len(damaged) == 1 and damaged[0].name.startswith("10.") and (damaged[0] / victim).is_file()
  assert (step10 / "integrity.json").is_file(), "step 10 was trained and saved again after the fallback"
  assert (step10 / victim).exists() is False or (step10 / victim).read_bytes() != b"garbage"


@pytest.mark.slow
def test_dataset_built_into_bucket_trains_and_exports_to_bucket(gcs, tmp_path):
  from unclip_jax import bundle
  from unclip_jax.data import builders, pipeline

  n, e, length = 16, 32, 16
  rng = np.random.default_rng(0)
  mask = np.arange(length)[None, :] < rng.integers(3, length, (n, 1))
  arrays = {"image_emb": rng.standard_normal((n, e)).astype(np.float32),
            "text_emb": rng.standard_normal((n, e)).astype(np.float32),
            "text_enc": rng.standard_normal((n, length, e)).astype(np.float32), "text_mask": mask,
            "tokens": np.where(mask, rng.integers(1, 49408, (n, length)), 0).astype(np.int32)}
  out = builders.build_embeddings(arrays, _url("data"), "emb")
  assert str(out).startswith(f"gs://{BUCKET}/data/embeddings/emb/")
  assert (out / "dataset_info.json").is_file()
  assert str(pipeline.resolve_dataset_dir(_url("data"))) == str(out)
  with pytest.raises(FileExistsError, match="already exists"):
    builders.build_embeddings(arrays, _url("data"), "emb")
  os.environ["UNCLIP_JAX_DATA_CACHE"] = str(tmp_path / "cache")
  try:
    source, _ = pipeline.open_source(_url("data"))
    assert len(source) == n
    np.testing.assert_array_equal(np.asarray(source[3]["image_emb"]), arrays["image_emb"][3])
  finally:
    os.environ.pop("UNCLIP_JAX_DATA_CACHE", None)
  root = HERE.parent
  env = dict(os.environ, **gcs, PYTHONUNBUFFERED="1", UNCLIP_JAX_DATA_CACHE=str(tmp_path / "cache2"))
  cmd = [sys.executable, "-m", "unclip_jax.train", f"--config={root}/configs/prior.py:tiny",
         f"--workdir={_url('prior')}", f"--config.data.dirs=('{_url('data')}',)", "--config.num_train_steps=2",
         "--config.stats_examples=8", "--config.dtype=float32", "--config.log_every=1", "--config.eval_every=0"]
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root, env=env)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  assert (epath.Path(_url("prior")) / "checkpoints" / "2" / "integrity.json").is_file()
  res = subprocess.run([sys.executable, "-m", "unclip_jax.convert", "from-training", _url("bundle_prior"),
                        "--workdir", _url("prior"), "--component", "prior"],
                       capture_output=True, text=True, timeout=300, cwd=root, env=env)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  cfg2, _ = bundle.load_component(_url("bundle_prior"), "prior")
  assert cfg2.stage == "prior" and bundle.verify_bundle(_url("bundle_prior")) == ["prior"]


@pytest.fixture(scope="module")
def remote_bundle(gcs, tmp_path_factory):
  """A tiny bundle (clip, prior, decoder) written into the bucket component by component."""
  import helpers
  from unclip_jax import bundle

  local = helpers.build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "bundle", super_res=False)
  remote = _url("bundle")
  for name in bundle.list_components(local):
    cfg, params = bundle.load_component(local, name)
    bundle.save_component(remote, name, cfg, params)
  return remote


def test_bundle_component_in_bucket_round_trips_and_damage_is_caught(gcs):
  import helpers
  from unclip_jax import bundle
  from unclip_jax.stages import builders

  _, prior_cfg, _, _ = helpers.tiny_configs()
  params = builders.init_prior(builders.prior(prior_cfg.model), jax.random.key(0))
  remote = _url("bundle_one")
  bundle.save_component(remote, "prior", prior_cfg, params)
  assert bundle.verify_bundle(remote) == ["prior"]
  cfg, loaded = bundle.load_component(remote, "prior")
  assert cfg.stage == "prior"
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))
  (epath.Path(remote) / "prior" / "config.json").write_text("{}")
  with pytest.raises(ValueError, match="damaged"):
    bundle.load_component(remote, "prior")
  assert not pathlib.Path("gs:").exists(), "a URL must never become a local folder"


@pytest.mark.slow
def test_bundle_in_bucket_samples_into_bucket(remote_bundle, capsys):
  from unclip_jax import sample

  # An unreachable --out fails before the model loads.
  assert sample.main(["--prompt", "x", "--out", "gs://no-such-bucket/o", "--bundle", remote_bundle]) == 2
  assert "--out gs://no-such-bucket/o cannot be written" in capsys.readouterr().err
  from unclip_jax import bundle

  assert bundle.verify_bundle(remote_bundle) == ["clip", "prior", "decoder"]
  out = _url("samples")
  assert sample.main(["--prompt", "a red circle", "--out", out, "--bundle", remote_bundle, "--prior-steps", "3",
                      "--decoder-steps", "3", "--no-progress", "--compilation-cache", ""]) == 0
  written = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert written["out"] == out and written["written"] == 1
  root = epath.Path(out)
  assert (root / "0000.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert (root / "grid.png").is_file() and json.loads((root / "0000.json").read_text())["prompt"] == "a red circle"
  assert json.loads((root / "manifest.json").read_text())["images"] == 1
  assert json.loads((root / "summary.json").read_text())["images"] == 1
  assert not pathlib.Path("gs:").exists(), "a URL must never become a local folder"


# ---- several hosts ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_train_into_the_bucket_and_resume(gcs, tmp_path):
  """launch/gpu.sh, 2 CPU processes of 4 devices (one 8-device mesh), --workdir in the bucket: each process writes
  its own array shards, process 0 the shared files; a second launch resumes from the bucket on both processes."""
  import helpers

  data = helpers.random_embeddings_dataset(tmp_path)
  run = _url("two_hosts")
  logs = helpers.two_process_train(run, data, "--config.num_train_steps=3", log_dir=tmp_path / "logs1",
                                   timeout=480)
  for i in range(2):
    assert f"process {i} of 2, 4 local / 8 global devices" in logs[i] and "finished prior at step 3" in logs[i]
  root = epath.Path(run)
  step = root / "checkpoints" / "3"
  assert (step / "commit_success.txt").is_file() and (step / "integrity.json").is_file()
  shards = sorted(p.name for p in (step / "state").iterdir() if p.name.startswith("ocdbt.process_"))
  assert shards == ["ocdbt.process_0", "ocdbt.process_1"], shards
  record = json.loads((step / "integrity.json").read_text())
  assert any(f.startswith("state/ocdbt.process_1/") for f in record["files"]), "process 1's shards are recorded"
  events = list((root / "tensorboard").iterdir())
  assert len(events) == 1, f"only process 0 writes TensorBoard events: {events}"
  logs = helpers.two_process_train(run, data, "--config.num_train_steps=5", log_dir=tmp_path / "logs2",
                                   timeout=480)
  for i in range(2):
    assert "resumed from step 3" in logs[i] and "finished prior at step 5" in logs[i]
  assert (root / "checkpoints" / "5" / "integrity.json").is_file()
  assert not pathlib.Path("gs:").exists() and not (helpers.ROOT / "gs:").exists()
