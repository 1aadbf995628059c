"""A tiny training job run as a subprocess by test_train_loop.py (killed, preempted, resumed).

  python tests/toy_train_job.py WORKDIR NUM_STEPS OUT.npz [--sleep S] [--max-steps N]
"""
import argparse
import pathlib
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from unclip_jax import config_lib  # noqa: E402
from unclip_jax.train import loop  # noqa: E402
from unclip_jax.stages import common  # noqa: E402


class ToyMLP(nn.Module):
  hidden: int = 32

  @nn.compact
  def __call__(self, x, rng=None):
    h = nn.gelu(nn.Dense(self.hidden, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                      ("embed", "mlp")))(x))
    if rng is not None:
      h = h * jax.random.bernoulli(rng, 0.9, h.shape) / 0.9
    return nn.Dense(x.shape[-1])(h)


class StepIndexedBatches:
  """Batch i is a pure function of i; the position is checkpointable like a grain iterator's."""

  def __init__(self, batch=16, dim=8, sleep=0.0):
    self.index, self.batch, self.dim, self.sleep = 0, batch, dim, sleep

  def __iter__(self):
    return self

  def __next__(self):
    time.sleep(self.sleep)
    rng = np.random.default_rng(self.index)
    self.index += 1
    x = rng.standard_normal((self.batch, self.dim)).astype(np.float32)
    return {"x": x, "y": np.tanh(x[:, ::-1]).copy()}

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = int(state["index"])


def make_task(sleep=0.0, hidden=32):
  model = ToyMLP(hidden)

  def loss_fn(params, batch, rng):
    loss = jnp.mean((model.apply({"params": params}, batch["x"], rng) - batch["y"]) ** 2)
    return loss, {"mse": loss}

  return common.Task(init_params=lambda rng: model.init(rng, jnp.zeros((1, 8)))["params"], loss_fn=loss_fn,
                   data=StepIndexedBatches(sleep=sleep))


def make_config(num_steps, ckpt_every=5):
  cfg = config_lib.base_config("prior")
  cfg.num_train_steps = num_steps
  cfg.optim.update(lr=1e-2, warmup_steps=2, ema_decay=0.9)
  cfg.update(log_every=5, ckpt_every=ckpt_every, keep_checkpoints=2, fsdp_min_bytes=0)
  cfg.mesh.update(data=2, fsdp=4, tensor=1)
  return cfg


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("num_steps", type=int)
  parser.add_argument("out")
  parser.add_argument("--sleep", type=float, default=0.0)
  parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (of NUM_STEPS)")
  args = parser.parse_args()
  state = loop.train(make_config(args.num_steps), args.workdir, make_task(args.sleep), max_steps=args.max_steps)
  flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state.params)}
  np.savez(args.out, step=int(state.step), **flat)


if __name__ == "__main__":
  main()
