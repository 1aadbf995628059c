"""The shared training loop: resume is exact (in process, after SIGKILL) and SIGTERM checkpoints and exits."""
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import toy_train_job as job
from unclip_jax.ckpt.manager import CheckpointManager
from unclip_jax.train import loop

JOB = pathlib.Path(__file__).with_name("toy_train_job.py")


def _params(state):
  return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_resume_in_process_is_exact(tmp_path):
  straight = loop.train(job.make_config(8, ckpt_every=4), tmp_path / "a", job.make_task())
  first = loop.train(job.make_config(8, ckpt_every=4), tmp_path / "b", job.make_task(), max_steps=3)
  assert int(first.step) == 3
  assert CheckpointManager(tmp_path / "b" / "checkpoints").latest_step() == 3
  resumed = loop.train(job.make_config(8, ckpt_every=4), tmp_path / "b", job.make_task())
  assert int(resumed.step) == 8
  for a, b in zip(_params(resumed), _params(straight)):
    np.testing.assert_array_equal(a, b)
  assert list((tmp_path / "a" / "tensorboard").iterdir()), "TensorBoard event files are written"


def _run(args, **kwargs):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  return subprocess.Popen([sys.executable, str(JOB), *map(str, args)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, **kwargs)


def _wait_for_checkpoint(workdir, proc, min_step, timeout=120):
  deadline = time.time() + timeout
  ckpt_dir = pathlib.Path(workdir) / "checkpoints"
  while time.time() < deadline:
    steps = [int(p.name) for p in ckpt_dir.glob("*") if p.name.isdigit()] if ckpt_dir.exists() else []
    if steps and max(steps) >= min_step:
      return
    if proc.poll() is not None:
      raise AssertionError(f"job exited early:\n{proc.stdout.read().decode()}")
    time.sleep(0.05)
  raise AssertionError("no checkpoint appeared in time")


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
  steps = 30
  reference = _run([tmp_path / "ref", steps, tmp_path / "ref.npz"])
  assert reference.wait(timeout=300) == 0, reference.stdout.read().decode()

  victim = _run([tmp_path / "run", steps, tmp_path / "run.npz", "--sleep", "0.1"])
  _wait_for_checkpoint(tmp_path / "run", victim, min_step=10)
  victim.send_signal(signal.SIGKILL)
  victim.wait(timeout=60)
  assert not (tmp_path / "run.npz").exists(), "the job was killed before finishing"

  resumed = _run([tmp_path / "run", steps, tmp_path / "run.npz"])
  assert resumed.wait(timeout=300) == 0, resumed.stdout.read().decode()
  ref, got = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "run.npz")
  assert int(got["step"]) == steps
  for key in ref.files:
    np.testing.assert_array_equal(got[key], ref[key], err_msg=key)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
  proc = _run([tmp_path / "run", 1000, tmp_path / "out.npz", "--sleep", "0.05"])
  _wait_for_checkpoint(tmp_path / "run", proc, min_step=5)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, proc.stdout.read().decode()
  out = np.load(tmp_path / "out.npz")
  stopped_at = int(out["step"])
  assert 5 <= stopped_at < 1000
  assert CheckpointManager(tmp_path / "run" / "checkpoints").latest_step() == stopped_at
