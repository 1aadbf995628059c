"""Every stage trains through the shared loop on tiny datasets written by the project's own builders."""
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from unclip_jax import config_lib
from unclip_jax.data import builders
from unclip_jax.shapes import data as shapes
from unclip_jax import stages
from unclip_jax.train import loop
from unclip_jax.stages import common
from unclip_jax.inference import images as images_lib

N = 16


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  images = shapes.build(root, N, image_size=32, seed=0)
  rng = np.random.default_rng(0)
  e, length = 32, 16
  mask = np.arange(length)[None, :] < rng.integers(3, length, (N, 1))
  emb = builders.build_embeddings(
      {"image_emb": rng.standard_normal((N, e)).astype(np.float32),
       "text_emb": rng.standard_normal((N, e)).astype(np.float32),
       "text_enc": rng.standard_normal((N, length, e)).astype(np.float32), "text_mask": mask,
       "tokens": np.where(mask, rng.integers(1, 49408, (N, length)), 0).astype(np.int32)},
      root, "emb")
  return {"images": str(images), "emb": str(emb)}


def _cfg(stage, dirs, **overrides):
  cfg = config_lib.load_config(f"configs/{stage}.py:tiny",
                               [f"data.dirs={tuple(dirs)!r}", "num_train_steps=2", "log_every=1", "ckpt_every=2",
                                "eval_every=0", "eval_examples=4",
                                "dtype='float32'", "batch_size=8", "mesh.data=4", "mesh.fsdp=2", "optim.warmup_steps=0",
                                *[f"{k}={v!r}" for k, v in overrides.items()]])
  return cfg


@pytest.mark.parametrize("stage,data,overrides", [
    ("prior", ("emb",), {"stats_examples": 8, "eval_every": 2, "sampling.steps": "5"}),
    ("ar_prior", ("emb",), {"stats_examples": 16, "eval_every": 2}),
    ("decoder", ("images", "emb"), {"model.image_size": 32, "eval_every": 2, "sampling.steps": "3"}),
    # the unCLIP paper's decoder pathway: GLIDE's transformer on the stored caption tokens + the CLIP image embedding
    ("decoder", ("images", "emb"), {"model.image_size": 32, "eval_every": 2, "sampling.steps": "3",
                                    "model.text_encoder": "glide_clip", "model.n_vocab": 49408}),
    ("upsampler", ("images",), {"eval_every": 2, "sampling.steps": "3"}),
    ("clip", ("images",), {"model.text.vocab_size": 49408, "model.vision.image_size": 32,
                           "model.vision.patch_size": 8, "eval_every": 2}),
])
def test_stage_trains_and_checkpoints(stage, data, overrides, datasets, tmp_path):
  cfg = _cfg(stage, [datasets[d] for d in data], **overrides)
  mesh = loop.mesh_lib.make_mesh(dict(cfg.mesh))
  task = stages.make_task(cfg, mesh=mesh)
  state = loop.train(cfg, tmp_path / stage, task, mesh=mesh)
  assert int(state.step) == 2
  init = jax.jit(task.init_params)(jax.random.split(jax.random.key(cfg.seed))[0])
  changed = [not np.allclose(np.asarray(a), np.asarray(b)) for a, b in
             zip(jax.tree.leaves(state.params), jax.tree.leaves(init))]
  assert sum(changed) > len(changed) // 2, "training updates most parameters"
  assert (tmp_path / stage / "checkpoints" / "2").is_dir()
  if cfg.eval_every:
    evaluated = task.evaluate(state.ema_params)
    assert evaluated and all(np.isfinite(np.asarray(v)).all() for v in evaluated.values())
    if "samples" in evaluated:                     # the decoder's and upsampler's image grids were written
      assert (tmp_path / stage / "samples" / "samples_0000002.png").is_file()


def test_prior_clip_statistics_come_from_the_data(datasets):
  cfg = _cfg("prior", [datasets["emb"]], stats_examples=16)
  task = stages.make_task(cfg)
  params = task.init_params(jax.random.key(0))
  assert params["clip_std"].shape == (1, 32)
  assert np.all(np.asarray(params["clip_std"]) > 0.3)      # N(0, 1) data, not the default zeros/ones


def test_missing_data_is_a_clear_error():
  cfg = config_lib.load_config("configs/prior.py:tiny")
  with pytest.raises(ValueError, match="needs data: set --config.data.dirs"):
    stages.make_task(cfg)


@pytest.mark.slow
def test_train_cli_runs_a_stage(datasets, tmp_path):
  root = pathlib.Path(__file__).resolve().parent.parent
  cmd = [sys.executable, "-m", "unclip_jax.train", f"--config={root}/configs/prior.py:tiny",
         f"--workdir={tmp_path}", f"--config.data.dirs=('{datasets['emb']}',)", "--config.num_train_steps=3",
         "--config.stats_examples=8", "--config.dtype=float32", "--config.log_every=1"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert (tmp_path / "checkpoints" / "3").is_dir()
  bad = subprocess.run(cmd[:3] + [f"--workdir={tmp_path}/x", "--config.no_such_key=1"], capture_output=True,
                       text=True, timeout=120, cwd=root)
  assert bad.returncode != 0 and "no_such_key" in bad.stderr


def test_ar_prior_statistics_are_frozen_params(datasets, tmp_path):
  cfg = _cfg("ar_prior", [datasets["emb"]], stats_examples=16)
  task = stages.make_task(cfg)
  state = loop.train(cfg, tmp_path, task)
  init = task.init_params(jax.random.key(0))
  for name, value in init["stats"].items():      # fitted on the data, untouched by the optimiser and the EMA
    np.testing.assert_array_equal(np.asarray(state.params["stats"][name]), np.asarray(value), err_msg=name)
    np.testing.assert_allclose(np.asarray(state.ema_params["stats"][name]), np.asarray(value), rtol=1e-6,
                               err_msg=name)     # EMA of a constant: equal up to rounding
  assert init["stats"]["pca_components"].shape == (cfg.model.num_components, 32)


def test_evaluation_writes_scalars_and_image_grids(tmp_path):
  images = np.linspace(-1, 1, 5 * 4 * 6 * 3, dtype=np.float32).reshape(5, 4, 6, 3)
  grid = images_lib.image_grid(images)
  assert grid.shape == (2 * 4, 3 * 6, 3) and grid.dtype == np.uint8
  np.testing.assert_array_equal(grid[4:8, 6:12], np.clip(np.round((images[4] + 1) * 127.5), 0, 255))
  assert not grid[4:, 12:].any()                 # padding of the unused sixth cell
  task = common.Task(init_params=None, loss_fn=None, data=None,
                   evaluate=lambda params: {"samples": images, "score": np.float32(0.5)})
  writer = loop.MetricsWriter(tmp_path, total_steps=1, start_step=0)
  assert loop.run_evaluation(task, None, 7, writer) == {"eval/score": 0.5}
  writer.close()
  assert (tmp_path / "samples" / "samples_0000007.png").is_file()
  with pytest.raises(ValueError, match="expected a scalar"):
    loop.run_evaluation(common.Task(None, None, None, evaluate=lambda p: {"bad": np.zeros((2, 3))}), None, 1, writer)
