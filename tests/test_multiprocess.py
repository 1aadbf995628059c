"""Multi-host training for real: launch/gpu.sh starts 2 processes (4 CPU devices each) that form one 8-device mesh."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from unclip_jax.data import builders

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_two_processes_train_one_global_mesh(tmp_path):
  rng = np.random.default_rng(0)
  n, e, length = 32, 32, 16
  emb = builders.build_embeddings(
      {"image_emb": rng.standard_normal((n, e)).astype(np.float32),
       "text_emb": rng.standard_normal((n, e)).astype(np.float32),
       "text_enc": rng.standard_normal((n, length, e)).astype(np.float32),
       "text_mask": np.ones((n, length), bool)}, tmp_path, "emb")
  workdir = tmp_path / "run"
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(UNCLIP_LAUNCH_CPU="1", NPROC="2", CPU_DEVICES="4", UNCLIP_VENV=str(pathlib.Path(sys.executable).parent.parent))
  cmd = ["bash", str(ROOT / "launch" / "gpu.sh"), f"--config={ROOT}/configs/prior.py:tiny", f"--workdir={workdir}",
         f"--config.data.dirs=('{emb}',)", "--config.num_train_steps=3", "--config.stats_examples=8",
         "--config.dtype=float32", "--config.log_every=1", "--config.eval_every=0", "--config.mesh.data=4",
         "--config.mesh.fsdp=2"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
  logs = {i: (workdir / "logs" / f"process_{i}.log").read_text() for i in range(2)}
  assert out.returncode == 0, out.stderr[-2000:] + logs[0][-3000:] + logs[1][-3000:]
  for i in range(2):
    assert f"process {i} of 2, 4 local / 8 global devices" in logs[i]
    assert "finished prior at step 3" in logs[i]
  assert (workdir / "checkpoints" / "3").is_dir()
