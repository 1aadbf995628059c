"""Multi-host training for real: launch/gpu.sh starts 2 processes (4 CPU devices each) that form one 8-device mesh."""
import pytest

from helpers import random_embeddings_dataset, two_process_train


@pytest.mark.slow
def test_two_processes_train_one_global_mesh(tmp_path):
  workdir = tmp_path / "run"
  logs = two_process_train(workdir, random_embeddings_dataset(tmp_path), "--config.num_train_steps=3")
  for i in range(2):
    assert f"process {i} of 2, 4 local / 8 global devices" in logs[i]
    assert "finished prior at step 3" in logs[i]
  assert (workdir / "checkpoints" / "3").is_dir()
