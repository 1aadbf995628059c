"""Batch sampling at scale (#19): per-row keys, resumable multi-host jobs, prompt sets, webdataset shards."""
from __future__ import annotations

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import tarfile
import time

import jax
import numpy as np
import pytest

from helpers import build_tiny_bundle
from unclip_jax import sample
from unclip_jax.diffusion import samplers
from unclip_jax.inference import batch, job as job_lib, prompt_sets
from unclip_jax.inference.pipeline import UnCLIP

ROOT = pathlib.Path(__file__).resolve().parent.parent
FAST = ["--prior-steps", "2", "--decoder-steps", "2", "--no-progress"]
SAMPLING = {"prior": {"steps": "2"}, "decoder": {"steps": "2"}}
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a purple circle", "a red square"]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
  return build_tiny_bundle(tmp_path_factory.mktemp("bundle"), super_res=False)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("prompts") / "p.txt"
  path.write_text("\n".join(PROMPTS) + "\n\n")
  return path


def _pngs(out: pathlib.Path) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(out.glob("[0-9]*.png"))}


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  return env


# ---- noise and keys -----------------------------------------------------------------------------------------------
def test_per_row_step_noise_is_independent_of_the_batch():
  keys = batch.row_keys(3, [0, 1, 2, 3], [0, 0, 1, 1])
  whole = samplers.step_noise(keys, 5, (4, 6), np.float32)
  for b in range(4):
    alone = samplers.step_noise(keys[b:b + 1], 5, (1, 6), np.float32)
    np.testing.assert_array_equal(whole[b:b + 1], alone)
  # a single key keeps the old whole-batch draw (the parity tests feed that)
  key = jax.random.key(0)
  np.testing.assert_array_equal(samplers.step_noise(key, 2, (3, 4), np.float32),
                                jax.random.normal(jax.random.fold_in(key, 2), (3, 4)))
  with pytest.raises(ValueError, match="per-row keys"):
    samplers.step_noise(keys, 0, (3, 6), np.float32)


def test_row_keys_depend_on_seed_prompt_and_k_only():
  a = jax.random.key_data(batch.row_keys(0, [4, 2], [1, 0]))
  b = jax.random.key_data(batch.row_keys(0, [9, 2], [0, 0]))
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], b[0])
  assert not np.array_equal(a, jax.random.key_data(batch.row_keys(1, [4, 2], [1, 0])))


# ---- the pipeline -------------------------------------------------------------------------------------------------
def test_row_by_row_matches_one_row_calls_bitwise():
  """A reduction XLA:CPU computes with a batch-dependent summation order (YNNPACK for 8 rows, its own loop for 1)."""
  from unclip_jax.inference.pipeline import data_mesh, row_by_row

  x = (np.random.default_rng(0).standard_normal((8, 16, 64)) * 3 + 1).astype(np.float32)
  w = np.float32(0.5)
  fn = lambda w, x: ((x * w).sum(-1), x[:, :1] * w)             # [B, 16], [B, 1, 64]
  ones = [jax.jit(fn)(w, x[i:i + 1]) for i in range(8)]
  for devices in (jax.devices()[:1], jax.devices()[:8], jax.devices()[:3]):   # 3: 8 rows do not divide, replicated
    got = jax.jit(row_by_row(fn, 1, data_mesh(devices)))(w, x)
    for j in range(2):
      np.testing.assert_array_equal(np.asarray(got[j]), np.concatenate([np.asarray(o[j]) for o in ones]))


def test_batch_invariant_images_bitwise_equal_for_batch_1_and_8(bundle_dir):
  pipe = UnCLIP.from_bundle(bundle_dir, sampling=SAMPLING)
  assert pipe.batch_invariant and pipe.settings()["batch_invariant"]              # the default on CPU
  idx, k = [0, 1, 2, 3, 4], [0, 1, 0, 2, 0]
  caps = [PROMPTS[i] for i in idx]
  eight = batch.sample_rows(pipe, caps, idx, k, seed=0, batch_size=8).images      # one batch, padded to 8
  ones = batch.sample_rows(pipe, caps, idx, k, seed=0, batch_size=1).images
  np.testing.assert_array_equal(eight, ones)
  t8, t1 = pipe.encode_text(caps), pipe.encode_text(caps[:1])
  np.testing.assert_array_equal(np.asarray(t8.enc[:1]), np.asarray(t1.enc))
  # explicit prior x_T [n·B, E] (candidate-major) goes to the right rows
  keys = batch.row_keys(0, idx[:3], k[:3])
  n, e = int(pipe.prior_cfg.num_candidates), pipe.prior.embedding_dim
  x_T = jax.random.normal(jax.random.key(5), (n * 3, e))
  whole = pipe.sample_prior(t8.take(slice(0, 3)), keys, x_T)
  for b in range(3):
    np.testing.assert_array_equal(np.asarray(whole[b:b + 1]), np.asarray(pipe.sample_prior(
        t8.take(slice(b, b + 1)), keys[b:b + 1], x_T[b::3])))
  other = batch.sample_rows(pipe, caps, idx, k, seed=1, batch_size=8).images
  assert np.abs(eight.astype(int) - other).mean() > 5


@pytest.mark.slow
def test_images_do_not_depend_on_batch_size_or_devices(bundle_dir):
  idx, k = [0, 1, 2, 3], [0, 1, 0, 2]
  caps = [PROMPTS[i] for i in idx]
  for invariant in (True, False):
    pipe = UnCLIP.from_bundle(bundle_dir, sampling=SAMPLING, batch_invariant=invariant)
    four = batch.sample_rows(pipe, caps, idx, k, seed=0, batch_size=4).images
    np.testing.assert_array_equal(four, pipe.generate(PROMPTS[:4], seed=0, images_per_prompt=3, batch_size=4).images[
        [0, 4, 6, 11]])
    # the same batch shape: bitwise, also for a short batch padded to it (rows sit elsewhere in the batch)
    again = batch.sample_rows(pipe, caps[2:], idx[2:], k[2:], seed=0, batch_size=4).images
    np.testing.assert_array_equal(four[2:], again)
    ones = batch.sample_rows(pipe, caps, idx, k, seed=0, batch_size=1).images
    eight = UnCLIP.from_bundle(bundle_dir, sampling=SAMPLING, devices=jax.devices()[:8], batch_invariant=invariant)
    assert eight.mesh.size == 8
    on8 = batch.sample_rows(eight, caps + caps, idx + idx, k + k, seed=0, batch_size=8).images
    np.testing.assert_array_equal(on8[:4], on8[4:])           # a row's image does not depend on its neighbours
    if invariant:                                             # bitwise across batch shapes and device counts
      np.testing.assert_array_equal(four, ones)
      np.testing.assert_array_equal(four, on8[:4])
    else:       # batched: XLA:CPU picks kernels and summation orders by shape, so float noise (≤ 3/255 here)
      assert np.abs(four.astype(int) - ones).max() <= 3 and np.abs(four.astype(int) - on8[:4]).max() <= 3


_ONE_DEVICE_SAMPLE = """
import sys, numpy as np, jax
from unclip_jax.inference import batch
from unclip_jax.inference.pipeline import UnCLIP
assert len(jax.devices()) == 1
pipe = UnCLIP.from_bundle(sys.argv[1], sampling={"prior": {"steps": "2"}, "decoder": {"steps": "2"}})
caps = sys.argv[3].split("|")
np.save(sys.argv[2], batch.sample_rows(pipe, caps, list(range(len(caps))), [0] * len(caps), seed=0,
                                       batch_size=1).images)
"""


@pytest.mark.slow
def test_one_forced_cpu_device_process_matches_eight_devices(bundle_dir, tmp_path):
  """A process with 1 forced CPU device at batch 1 vs this one's 8-device mesh at batch 8: bitwise."""
  caps = PROMPTS + PROMPTS[:3]
  env = dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", _ONE_DEVICE_SAMPLE, str(bundle_dir), str(tmp_path / "one.npy"),
                  "|".join(caps)], check=True, env=env, timeout=600, capture_output=True)
  eight = UnCLIP.from_bundle(bundle_dir, sampling=SAMPLING, devices=jax.devices()[:8])
  on8 = batch.sample_rows(eight, caps, list(range(8)), [0] * 8, seed=0, batch_size=8).images
  np.testing.assert_array_equal(np.load(tmp_path / "one.npy"), on8)


# ---- prompt sets --------------------------------------------------------------------------------------------------
def test_prompt_set_formats(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  rows = [{"id": "a1", "caption": "a red circle"}, {"id": "b2", "caption": "a blue square"}]
  (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  with open(tmp_path / "p.csv", "w", newline="") as f:
    w = csv.DictWriter(f, ["id", "caption"])
    w.writeheader()
    w.writerows(rows)
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
  for suffix in ("jsonl", "csv", "parquet"):
    s = prompt_sets.read(tmp_path / f"p.{suffix}")
    assert s.ids == ["a1", "b2"] and s.captions == ["a red circle", "a blue square"], suffix
  (tmp_path / "q.jsonl").write_text('{"text": "x"}\n{"text": "y"}\n')
  assert prompt_sets.read(tmp_path / "q.jsonl").ids == ["0", "1"]
  (tmp_path / "r.txt").write_text("one\n\n two \n")
  assert prompt_sets.read(tmp_path / "r.txt").captions == ["one", "two"]
  with pytest.raises(ValueError, match="no caption column"):
    (tmp_path / "bad.csv").write_text("id,words\n1,x\n")
    prompt_sets.read(tmp_path / "bad.csv")
  with pytest.raises(ValueError, match="unique"):
    (tmp_path / "dup.jsonl").write_text('{"id": 1, "caption": "x"}\n{"id": 1, "caption": "y"}\n')
    prompt_sets.read(tmp_path / "dup.jsonl")
  assert prompt_sets.read(tmp_path / "p.csv").digest() == prompt_sets.read(tmp_path / "p.parquet").digest()


def _coco(path: pathlib.Path, images: int = 20) -> pathlib.Path:
  anns = [{"id": 10 * i + j, "image_id": 1000 + i, "caption": f"image {i} caption {j} "}
          for i in range(images) for j in range(5)]
  path.write_text(json.dumps({"images": [{"id": 1000 + i} for i in range(images)], "annotations": anns}))
  return path


def test_coco_captions_protocol(tmp_path):
  path = _coco(tmp_path / "captions_val2014.json")
  a = prompt_sets.read_coco(path, 8, seed=3)
  assert a.source["image_ids"] == [int(i) for i in a.ids] and len(set(a.ids)) == 8
  for i, c in zip(a.ids, a.captions):
    assert c.startswith(f"image {int(i) - 1000} caption ")
  assert prompt_sets.read_coco(path, 8, seed=3).captions == a.captions
  assert prompt_sets.read_coco(path, 8, seed=4).ids != a.ids
  with pytest.raises(ValueError, match="--n must be in 1..20"):
    prompt_sets.read_coco(path, 21, seed=0)


# ---- the job, with a fake sampler ---------------------------------------------------------------------------------
class _Fake:
  """A sampler whose image is a function of (p, k): checks the job's bookkeeping without a model."""

  def __init__(self, fail_after: int | None = None, on_call=None):
    self.calls, self.fail_after, self.on_call = 0, fail_after, on_call

  def __call__(self, captions, prompt_index, k):
    if self.fail_after is not None and self.calls >= self.fail_after:
      raise KeyboardInterrupt("killed")
    self.calls += 1
    if self.on_call:
      self.on_call(self.calls)
    images = np.stack([np.full((4, 4, 3), 10 * p + kk, np.uint8) for p, kk in zip(prompt_index, k)])
    return batch.Rows(images, [None] * len(k))


def _plan(n=7, per=2, bs=3, shard=None):
  ps = prompt_sets.PromptSet([f"id{i}" for i in range(n)], [f"prompt {i}" for i in range(n)], {})
  return job_lib.Plan(ps, per, bs, shard or bs)


def test_units_split_over_processes_without_gaps_or_repeats():
  plan = _plan(n=13, per=3, bs=4)
  for count in (1, 2, 3, 8):
    rows = [r for p in range(count) for u in plan.units_of(p, count) for b in plan.batches(u) for r in b]
    assert sorted(rows) == list(range(len(plan.rows)))


def test_batches_skip_recorded_rows_in_contiguous_runs():
  plan = _plan(n=5, per=2, bs=3, shard=8)                        # unit 0 = rows 0..7
  assert plan.batches(0) == [range(0, 3), range(3, 6), range(6, 8)]
  assert plan.batches(0, frozenset({1, 2, 5})) == [range(0, 1), range(3, 5), range(6, 8)]
  assert plan.batches(1, frozenset(range(8, 10))) == []


@pytest.mark.parametrize("fmt", ["png", "webdataset"])
@pytest.mark.parametrize("resume_bs", [3, 2])
def test_job_resumes_to_the_uninterrupted_set(tmp_path, fmt, resume_bs):
  """Interrupted after 2 batches of 3, resumed with batch size `resume_bs`: the uninterrupted run's files."""
  full = tmp_path / "full"
  plan = _plan(shard=6 if fmt == "webdataset" else None)
  assert job_lib.Job(full, plan, _Fake(), {}, fmt=fmt, progress=False).run() == 0
  part = tmp_path / "part"
  with pytest.raises(KeyboardInterrupt):
    job_lib.Job(part, plan, _Fake(fail_after=2), {}, fmt=fmt, progress=False).run()
  rest = _Fake()
  resumed = _plan(bs=resume_bs, shard=6 if fmt == "webdataset" else None)   # png: units of one batch, as the CLI
  assert job_lib.Job(part, resumed, rest, {}, fmt=fmt, progress=False).run() == 0
  assert rest.calls == {3: 3, 2: 4}[resume_bs]                   # 8 rows left: 3+3+2 or 2+2+2+2
  names = lambda d: sorted(p.name for p in d.iterdir() if not p.name.startswith(".") and p.name != "summary.json")
  assert names(full) == names(part)
  for name in names(full):
    if name.endswith(".tar"):
      assert job_lib.tar_members(full / name) == job_lib.tar_members(part / name)
    else:
      assert (full / name).read_bytes() == (part / name).read_bytes(), name
  summary = json.loads((part / "summary.json").read_text())
  assert summary["images"] == 14 and summary["images_this_run"] == 14 - 6


def test_webdataset_shards(tmp_path):
  plan = _plan(n=5, per=2, bs=3, shard=4)
  assert job_lib.Job(tmp_path, plan, _Fake(), {"seed": 0}, fmt="webdataset", progress=False).run() == 0
  shards = sorted(tmp_path.glob("shard-*.tar"))
  assert [s.name for s in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
  with tarfile.open(shards[0]) as tar:
    assert tar.getnames() == ["id0_0.png", "id0_0.json", "id0_1.png", "id0_1.json", "id1_0.png", "id1_0.json",
                              "id1_1.png", "id1_1.json"]
  samples = list(job_lib.iter_webdataset(tmp_path))
  assert len(samples) == 10 and samples[0][2]["prompt"] == "prompt 0" and samples[0][2]["seed"] == 0
  assert not (tmp_path / ".partial").exists() or not any((tmp_path / ".partial").iterdir())


def test_sigterm_finishes_the_batch_and_exits_143(tmp_path):
  plan = _plan()
  fake = _Fake(on_call=lambda n: os.kill(os.getpid(), signal.SIGTERM) if n == 2 else None)
  assert job_lib.Job(tmp_path, plan, fake, {}, progress=False).run() == job_lib.PREEMPTED_EXIT_CODE
  assert fake.calls == 2 and len(list(tmp_path.glob("*.png"))) == 6
  assert job_lib.Job(tmp_path, plan, _Fake(), {}, progress=False).run() == 0
  assert len(list(tmp_path.glob("[0-9]*.png"))) == 14


def test_manifest_refuses_other_settings(tmp_path):
  m = {"hash": "a", "record": {"seed": 0}}
  job_lib.check_manifest(tmp_path, m, write=True)
  job_lib.check_manifest(tmp_path, m, write=True)
  with pytest.raises(ValueError, match=r"other settings \(differs in \['seed'\]\)"):
    job_lib.check_manifest(tmp_path, {"hash": "b", "record": {"seed": 1}}, write=True)


# ---- the CLI ------------------------------------------------------------------------------------------------------
def test_cli_png_rerun_skips_and_other_settings_are_refused(bundle_dir, prompts_file, tmp_path, capsys):
  out = tmp_path / "out"
  args = ["--prompts-file", str(prompts_file), "--out", str(out), "--bundle", str(bundle_dir), "--batch-size", "4",
          "--images-per-prompt", "2", *FAST]
  assert sample.main(args) == 0
  assert sorted(_pngs(out)) == [f"{i:04d}.png" for i in range(10)] and (out / "grid.png").is_file()
  meta = json.loads((out / "0003.json").read_text())
  assert meta["prompt"] == PROMPTS[1] and meta["prompt_index"] == 1 and meta["k"] == 1 and meta["index"] == 3
  summary = json.loads((out / "summary.json").read_text())
  assert summary["images"] == 10 and summary["images_this_run"] == 10 and summary["images_per_s"] > 0
  first = _pngs(out)
  assert sample.main(args) == 0
  assert json.loads((out / "summary.json").read_text())["images_this_run"] == 0 and _pngs(out) == first
  # batch-invariant (the CPU default): another batch size resumes the same run (nothing left to sample here)
  assert "batch_size" not in json.loads((out / "manifest.json").read_text())["record"]
  assert sample.main(args + ["--batch-size", "3"]) == 0
  assert json.loads((out / "summary.json").read_text())["images_this_run"] == 0 and _pngs(out) == first
  capsys.readouterr()
  assert sample.main(args + ["--seed", "1"]) == 2
  err = capsys.readouterr().err
  assert "other settings" in err and "seed" in err
  assert sample.main(args + ["--batch-invariant", "off"]) == 2
  assert "batch_invariant" in capsys.readouterr().err
  # batched sampling: the batch size changes the images, so it is part of the manifest and another one is refused
  off = tmp_path / "off"
  off_args = args[:3] + [str(off)] + args[4:] + ["--batch-invariant", "off"]
  assert sample.main(off_args + ["--images-per-prompt", "1"]) == 0
  assert json.loads((off / "manifest.json").read_text())["record"]["batch_size"] == 4
  capsys.readouterr()
  assert sample.main(off_args + ["--images-per-prompt", "1", "--batch-size", "3"]) == 2
  assert "batch_size" in capsys.readouterr().err
  # webdataset output of the same rows holds the same images as the png folder
  wds = tmp_path / "wds"
  assert sample.main(args[:3] + [str(wds)] + args[4:] + ["--format", "webdataset", "--shard-size", "6"]) == 0
  got = {key: png for key, png, _ in job_lib.iter_webdataset(wds)}
  assert len(got) == 10 and got["1_1"] == first["0003.png"]


def test_cli_coco_records_the_chosen_ids(bundle_dir, tmp_path):
  coco = _coco(tmp_path / "captions_val2014.json")
  out = tmp_path / "out"
  assert sample.main(["--coco-captions", str(coco), "--n", "3", "--seed", "5", "--out", str(out), "--bundle",
                      str(bundle_dir), "--batch-size", "4", *FAST]) == 0
  manifest = json.loads((out / "manifest.json").read_text())
  chosen = prompt_sets.read_coco(coco, 3, seed=5)
  assert manifest["prompts_source"]["image_ids"] == [int(i) for i in chosen.ids]
  assert [json.loads((out / f"{i:04d}.json").read_text())["prompt_id"] for i in range(3)] == chosen.ids


def _cli_cmd(bundle_dir, prompts_file, out, *extra, batch_size=1):
  return [sys.executable, "-m", "unclip_jax.sample", "--prompts-file", str(prompts_file), "--out", str(out),
          "--bundle", str(bundle_dir), "--batch-size", str(batch_size), "--images-per-prompt", "4", *FAST, *extra]


def _wait_for_first_batch(proc, out: pathlib.Path) -> None:
  deadline = time.time() + 600
  while not (out / ".done").is_dir() or not any((out / ".done").glob("*.json")):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
    time.sleep(0.02)


@pytest.mark.slow
def test_kill_9_and_sigterm_mid_run_then_resume(bundle_dir, prompts_file, tmp_path):
  """Interrupted at batch 1, resumed at batch 3 (SIGKILL) or 1 (SIGTERM): the files of an uninterrupted run at
  batch 8 (batch-invariant sampling, the CPU default)."""
  full = tmp_path / "full"
  subprocess.run(_cli_cmd(bundle_dir, prompts_file, full, batch_size=8), check=True, env=_env(), timeout=600,
                 capture_output=True)
  for how in (signal.SIGKILL, signal.SIGTERM):
    out = tmp_path / f"out_{how.name}"
    proc = subprocess.Popen(_cli_cmd(bundle_dir, prompts_file, out), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    _wait_for_first_batch(proc, out)
    proc.send_signal(how)
    rc = proc.wait(timeout=600)
    done = len(list((out / ".done").glob("*.json")))
    if how == signal.SIGTERM:
      assert rc == job_lib.PREEMPTED_EXIT_CODE, proc.stderr.read()[-2000:]
    else:
      assert rc == -9
    assert done < 20, "the run finished before it could be interrupted"
    assert len(_pngs(out)) >= done
    resume_bs = 3 if how == signal.SIGKILL else 1
    subprocess.run(_cli_cmd(bundle_dir, prompts_file, out, batch_size=resume_bs), check=True, env=_env(),
                   timeout=600, capture_output=True)
    assert _pngs(out) == _pngs(full), how.name
    assert json.loads((out / "summary.json").read_text())["images_this_run"] == 20 - done
    assert not list(out.glob(".*.tmp*"))


@pytest.mark.slow
def test_two_processes_split_the_work_and_match_one(bundle_dir, prompts_file, tmp_path):
  one = tmp_path / "one"
  # one process at batch 4 vs two at batch 1, each with the same XLA:CPU set-up (1 forced device): batch-invariant
  # sampling makes them bitwise equal (against this process's 8 forced devices the 2-process run differed in the
  # last bits, cause not yet found)
  subprocess.run(_cli_cmd(bundle_dir, prompts_file, one, batch_size=4), check=True, timeout=600,
                 capture_output=True,
                 env=dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu"))
  two = tmp_path / "two"
  env = {k: v for k, v in _env().items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(UNCLIP_LAUNCH_CPU="1", NPROC="2", CPU_DEVICES="1", UNCLIP_MODULE="unclip_jax.sample",
             UNCLIP_VENV=str(pathlib.Path(sys.executable).parent.parent), LOG_DIR=str(tmp_path / "logs"))
  cmd = ["bash", str(ROOT / "launch" / "gpu.sh"), *_cli_cmd(bundle_dir, prompts_file, two)[3:]]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
  logs = "".join((tmp_path / "logs" / f"process_{i}.log").read_text()[-3000:] for i in range(2))
  assert proc.returncode == 0, proc.stderr[-2000:] + logs
  assert _pngs(two) == _pngs(one)
  summary = json.loads((two / "summary.json").read_text())
  assert summary["processes"] == 2 and summary["images_this_run"] == 20
  assert [r["images"] for r in summary["per_process"]] == [10, 10]           # even and odd units


def test_legacy_uint32_keys_stay_one_key():
  key = jax.random.PRNGKey(0)                                     # uint32 [2]: one key, not two rows
  assert not samplers.is_row_keys(key) and samplers.is_row_keys(batch.row_keys(0, [0, 1], [0, 0]))
  np.testing.assert_array_equal(samplers.step_noise(key, 1, (2, 3), np.float32),
                                jax.random.normal(jax.random.fold_in(key, 1), (2, 3)))
