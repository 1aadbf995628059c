"""Sampler-loop benchmark: our jitted lax.scan DDPM sampler vs diffusers' UnCLIPScheduler driven by a Python loop.

Both run the same tiny MLP denoiser (identical weights) with classifier-free guidance batched into one call,
so the difference is the cost of the loop itself: per-step Python dispatch and scheduler arithmetic versus one
compiled program. Prints a table; nothing is asserted.

  python bench/sampler_loop.py [--batch 64] [--dim 768] [--hidden 2048] [--steps 25] [--repeats 5]
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np


def _mlp_params(dim, hidden, seed=0):
  rng = np.random.default_rng(seed)
  return dict(w1=(rng.standard_normal((dim + 1, hidden)) / np.sqrt(dim)).astype(np.float32),
              w2=(rng.standard_normal((hidden, dim)) / np.sqrt(hidden)).astype(np.float32))


def _time(fn, repeats):
  fn()                                                    # warm-up (and compile)
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def bench_ours(params, x_T, cond, steps, repeats):
  from unclip_jax.diffusion import gaussian, samplers, schedules

  diffusion = gaussian.GaussianDiffusion(schedules.NoiseSchedule.create(), prediction="x0",
                                         variance="fixed_small_log")
  settings = samplers.SamplerSettings(guidance_scale=4.0, clip_range=5.0, single_step_beta="schedule")

  def apply(p, x, t, c):
    h = jnp.concatenate([x + c, t[:, None].astype(x.dtype) / 1000.0], axis=-1)
    return jax.nn.gelu(h @ p["w1"]) @ p["w2"]

  run = samplers.make_sampler(apply, diffusion=diffusion, steps=str(steps), settings=settings)
  p, x, c = jax.device_put(params), jnp.asarray(x_T), jnp.asarray(cond)
  t0 = time.perf_counter()
  compiled = run.lower(p, c, x, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - t0
  flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
  seconds = _time(lambda: compiled(p, c, x, jax.random.key(0)).block_until_ready(), repeats)
  return seconds, compile_s, flops


def bench_diffusers(params, x_T, cond, steps, repeats):
  import torch
  from diffusers import UnCLIPScheduler

  w1, w2 = torch.from_numpy(params["w1"]), torch.from_numpy(params["w2"])
  sched = UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0)
  sched.set_timesteps(steps)
  x0, c = torch.from_numpy(x_T), torch.from_numpy(cond)

  @torch.no_grad()
  def run():
    x, g = x0.clone(), torch.Generator().manual_seed(0)
    ts = sched.timesteps.tolist()
    for i, t in enumerate(ts):
      xx = torch.cat([x, x])
      h = torch.cat([xx + c, torch.full((xx.shape[0], 1), t / 1000.0)], dim=-1)
      out = torch.nn.functional.gelu(h @ w1) @ w2
      u, k = out.chunk(2)
      x = sched.step(u + 4.0 * (k - u), t, x, prev_timestep=ts[i + 1] if i + 1 < len(ts) else None,
                     generator=g).prev_sample
    return x

  return _time(run, repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--dim", type=int, default=768)
  parser.add_argument("--hidden", type=int, default=2048)
  parser.add_argument("--steps", type=int, default=25)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--torch-threads", type=int, default=1,
                      help="torch intra-op threads (1: torch's pool does not fight XLA's for the same cores)")
  args = parser.parse_args()
  import torch

  torch.set_num_threads(args.torch_threads)

  params = _mlp_params(args.dim, args.hidden)
  rng = np.random.default_rng(1)
  x_T = rng.standard_normal((args.batch, args.dim)).astype(np.float32)
  cond = rng.standard_normal((2 * args.batch, args.dim)).astype(np.float32)
  ours, compile_s, flops = bench_ours(params, x_T, cond, args.steps, args.repeats)
  ref = bench_diffusers(params, x_T, cond, args.steps, args.repeats)
  model_flops = args.steps * 2 * (2 * args.batch) * ((args.dim + 1) * args.hidden + args.hidden * args.dim)
  device = jax.devices()[0].device_kind
  print(f"\nsampler loop, {args.steps} steps, guidance batched, batch {args.batch}, MLP {args.dim}->{args.hidden}, "
        f"device: {device}, torch threads: {args.torch_threads}")
  print("| implementation | s / batch | steps / s | model GFLOP / batch | XLA GFLOP / step | compile s | ratio |")
  print("|---|---|---|---|---|---|---|")
  print(f"| diffusers UnCLIPScheduler + torch loop | {ref:.4f} | {args.steps / ref:.0f} | {model_flops / 1e9:.2f} "
        f"| - | - | 1.00x |")
  print(f"| unclip_jax scan sampler (jit) | {ours:.4f} | {args.steps / ours:.0f} | {model_flops / 1e9:.2f} | "
        f"{flops / 1e9:.2f} | {compile_s:.2f} | {ref / ours:.2f}x |")


if __name__ == "__main__":
  main()
