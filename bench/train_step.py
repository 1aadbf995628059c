"""One training step per stage (decoder, prior, super-res, CLIP): AOT compile time, step time, FLOPs, MFU, memory.

The step is the one `train/loop.py` runs: `train/step.make_train_step` over the stage's real loss function from
`train/stages.py` / `prior_lib` (decoder_loss_fn, prior_lib.loss_fn, upsampler_loss_fn, clip_loss_fn) and the
optax optimiser of `train/optim.py`, jitted with the state donated and compiled ahead of time. Batches are
synthetic arrays of the shapes the stage's data pipeline yields (no datasets); the parameters are a random init.
One device, no mesh (the loop's shardings are the identity on one device).

  python bench/train_step.py --size karlo --stages decoder --batch 32 --remat none,dots_saveable --json out.json
  python bench/train_step.py --size tiny --batch 2 --repeats 1                        # CPU smoke size

Columns: XLA GFLOP/step is `compiled.cost_analysis()` (what train/loop.py logs; it includes remat recomputation);
model GFLOP/step is 3 × the matmul+conv FLOPs of the loss forward (jaxpr count). MFU = model FLOP/s / peak and
HFU = XLA FLOP/s / peak, against the device's dense bf16 peak (none on CPU). XLA mem is the compiled program's
arguments + outputs + temporaries - donated; peak mem is the device's peak so far (not reset between rows).
Results are printed, never asserted.
"""
from __future__ import annotations

import argparse
import functools
import gc
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

STAGES = ("decoder", "prior", "super_res", "clip")
CONFIGS = {"decoder": {"karlo": "decoder.py:karlo", "tiny": "decoder.py:tiny"},
           "prior": {"karlo": "prior.py:karlo", "tiny": "prior.py:tiny"},
           "super_res": {"karlo": "upsampler.py:karlo_64_256", "tiny": "upsampler.py:tiny"},
           "clip": {"karlo": "clip.py:vit_l14", "tiny": "clip.py:tiny"}}
TEXT_LENGTH = {"karlo": 77, "tiny": 16}          # CLIP context = prior num_embeddings at each size
DEFAULT_BATCH = {"karlo": {"decoder": 32, "prior": 256, "super_res": 32, "clip": 128},
                 "tiny": {"decoder": 8, "prior": 8, "super_res": 8, "clip": 8}}
COLUMNS = ("stage", "size", "batch", "dtype", "remat", "params M", "compile s", "step s", "examples/s",
           "XLA GFLOP/step", "model GFLOP/step", "MFU", "HFU", "XLA mem GiB", "XLA temp GiB", "peak mem GiB")


def stage_config(stage: str, size: str, *, dtype: str, remat: str):
  import ml_collections as mlc

  from unclip_jax import config_lib

  path, _, variant = CONFIGS[stage][size].partition(":")
  cfg = mlc.ConfigDict(config_lib.load_config(f"{common.CONFIG_DIR / path}:{variant}").to_dict())
  cfg.dtype, cfg.remat_policy = dtype, remat
  return cfg


def stage_task(stage: str, cfg, size: str):
  """(init_params(rng), loss_fn(params, batch, rng), make_batch(b, np_rng) -> numpy dict): what the stage's
  `make_task` builds, minus the data iterator (and the prior's data statistics: mean 0, std 1)."""
  import jax.numpy as jnp

  from unclip_jax import stages

  length = TEXT_LENGTH[size]

  def embeddings(b, rng, e):
    mask = np.arange(length)[None, :] < rng.integers(1, length + 1, (b, 1))
    return {"image_emb": rng.standard_normal((b, e), np.float32), "text_emb": rng.standard_normal((b, e), np.float32),
            "text_enc": rng.standard_normal((b, length, e), np.float32), "text_mask": mask}

  def images(b, rng, s):
    return rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32)

  if stage == "decoder":
    lib = stages.get("decoder")
    models = lib.build(cfg)
    e, s = models.text_proj.clip_embeddings_dim, cfg.model.image_size
    loss = functools.partial(lib.loss_fn, unet=models.unet, text_proj=models.text_proj, diffusion=models.diffusion,
                             clip_drop_prob=cfg.clip_drop_prob, text_drop_prob=cfg.text_drop_prob)
    return (lambda rng: lib.init_params(models, rng)), loss, lambda b, rng: {"image": images(b, rng, s),
                                                                            **embeddings(b, rng, e)}

  if stage == "prior":
    lib = stages.get("prior")
    models = lib.build(cfg)
    model = models.prior
    e = model.embedding_dim
    if model.num_embeddings != length:
      raise ValueError(f"prior num_embeddings {model.num_embeddings} != text length {length}")
    init = lambda rng: lib.with_clip_stats(lib.init_params(models, rng), jnp.zeros((1, e)), jnp.ones((1, e)))
    loss = functools.partial(lib.loss_fn, model=model, diffusion=models.diffusion, text_drop_prob=cfg.text_drop_prob)
    return init, loss, lambda b, rng: embeddings(b, rng, e)

  if stage == "super_res":
    from unclip_jax.data import degradations

    lib = stages.get("upsampler")
    models = lib.build(cfg)
    loss = functools.partial(lib.loss_fn, unet=models.unet, diffusion=models.diffusion,
                             make_pair=degradations.training_pair_from_config(cfg),
                             conditioning=cfg.model.conditioning, resize_method=cfg.model.resize_method)
    s = cfg.model.image_size
    return (lambda rng: lib.init_params(models, rng)), loss, lambda b, rng: {"image": images(b, rng, s)}

  if stage == "clip":
    lib = stages.get("clip")
    models = lib.build(cfg)
    text, vision = models.clip.config.text, models.clip.config.vision

    def make_batch(b, rng):
      ids = rng.integers(1, text.vocab_size - 1, (b, text.context_length)).astype(np.int32)
      ends = rng.integers(1, text.context_length, b)
      ids[np.arange(b), ends] = text.vocab_size - 1          # EOT, the largest id (argmax pooling)
      ids[np.arange(text.context_length)[None, :] > ends[:, None]] = 0
      px = rng.standard_normal((b, vision.image_size, vision.image_size, vision.num_channels)).astype(np.float32)
      return {"ids": ids, "pixels": px}
    return ((lambda rng: lib.init_params(models, rng)), functools.partial(lib.loss_fn, model=models.clip, mesh=None),
            make_batch)
  raise ValueError(f"unknown stage {stage!r}; choose from {STAGES}")


def bench_one(stage: str, size: str, batch: int, dtype: str, remat: str, repeats: int, seed: int,
              info: dict, compile_only: bool = False) -> dict:
  """One row: AOT compile, then `repeats` timed steps (compile_only: abstract state and batch, nothing allocated
  or run; the step columns stay empty)."""
  import flax.linen as nn
  import jax

  from unclip_jax.train import optim
  from unclip_jax.train.state import TrainState
  from unclip_jax.train.step import make_train_step

  cfg = stage_config(stage, size, dtype=dtype, remat=remat)
  cfg.batch_size = batch
  init, loss_fn, make_batch = stage_task(stage, cfg, size)
  tx = optim.make_optimizer(cfg)
  rng = jax.random.key(seed)
  batch_np = make_batch(batch, np.random.default_rng(seed))
  if compile_only:
    state = jax.eval_shape(lambda r: TrainState.create(nn.unbox(init(r)), tx), rng)
    data = common.abstract(batch_np)
  else:
    with common.timed(f"{stage}: init"):
      params = common.random_init(lambda r: nn.unbox(init(r)), rng, seed=seed)
      state = (jax.jit(TrainState.create, static_argnums=1) if info["platform"] != "cpu" else TrainState.create)(
          params, tx)
      common.block(state)
      del params
    data = jax.device_put(batch_np)
  step_fn = make_train_step(loss_fn, tx, ema_decay=cfg.optim.ema_decay, grad_accum=int(cfg.optim.grad_accum),
                            lr_schedule=optim.learning_rate_schedule(cfg))
  jitted = jax.jit(step_fn, donate_argnums=0)
  t0 = time.perf_counter()
  compiled = jitted.lower(state, data, rng).compile()
  compile_s = time.perf_counter() - t0
  xla = common.compiled_flops(compiled)
  model = 3.0 * common.jaxpr_flops(lambda p, b, r: loss_fn(p, b, r)[0], common.abstract(state.params),
                                   common.abstract(data), rng)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  memory = common.compiled_memory(compiled)
  step_s, times = None, []
  if not compile_only:
    def one():
      nonlocal state
      state, metrics = compiled(state, data, rng)
      common.block((state, metrics))

    step_s, times = common.median_seconds(one, repeats, warmup=1)
  row = {"stage": stage, "size": size, "batch": batch, "dtype": dtype, "remat": remat, "params": n_params,
         "compile_s": compile_s, "step_s": step_s, "steps_s": times,
         "examples_per_s": step_s and batch / step_s, "xla_flops_per_step": xla, "model_flops_per_step": model,
         "mfu": step_s and common.mfu(model / step_s, info["peak_flops"]),
         "hfu": step_s and common.mfu(xla and xla / step_s, info["peak_flops"]),
         "xla_mem_bytes": common.total_bytes(memory), "xla_temp_bytes": memory and memory["temporaries"],
         "peak_mem_bytes": None if compile_only else common.device_peak_bytes()}
  print(f"[bench] {stage} batch {batch} remat {remat}: compile {compile_s:.1f}s"
        + ("" if compile_only else f", step {step_s:.4f}s"), file=sys.stderr, flush=True)
  del state, compiled, data
  gc.collect()
  return row


def table(rows) -> str:
  gib = lambda x: common.fmt(x, ".3f", 1 / 2 ** 30)
  return common.markdown_table(COLUMNS, [
      [r["stage"], r["size"], r["batch"], r["dtype"], r["remat"], common.fmt(r["params"], ".4g", 1e-6),
       common.fmt(r["compile_s"], ".1f"), common.fmt(r["step_s"], ".4f"), common.fmt(r["examples_per_s"], ".1f"),
       common.fmt(r["xla_flops_per_step"], ".4g", 1e-9), common.fmt(r["model_flops_per_step"], ".4g", 1e-9),
       common.fmt(r["mfu"], ".1%"), common.fmt(r["hfu"], ".1%"), gib(r["xla_mem_bytes"]),
       gib(r.get("xla_temp_bytes")), gib(r["peak_mem_bytes"])] for r in rows])


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", choices=("karlo", "tiny"), default="karlo")
  p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
  p.add_argument("--batch", default=None,
                 help="comma-separated per-device batch sizes for every stage (default per stage: karlo decoder 32, "
                      "prior 256, super_res 32, clip 128; tiny 8)")
  p.add_argument("--remat", default="none",
                 help="comma-separated remat policies (the config's remat_policy, every stage: any of "
                      "models.layers.REMAT_POLICIES)")
  p.add_argument("--dtype", default=None, help="compute dtype (default: bfloat16 on accelerators, float32 on CPU)")
  p.add_argument("--repeats", type=int, default=5, help="timed steps (median reported) after one warm-up step")
  p.add_argument("--compile-only", action="store_true",
                 help="only compile each step from abstract state (nothing allocated or run): compile s, FLOPs and "
                      "the backend's memory estimate (XLA:CPU's does not show what remat saves: bench/NOTES.md)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="also write the results to this JSON file")
  return p


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  stages = [s.strip() for s in args.stages.split(",") if s.strip()]
  bad = [s for s in stages if s not in STAGES]
  if bad or not stages:
    raise SystemExit(f"error: --stages must name some of {STAGES}, got {args.stages!r}")
  if args.repeats < 1:
    raise SystemExit("error: --repeats must be >= 1")
  try:
    batches = common.parse_ints(args.batch, "--batch") if args.batch else None
  except ValueError as e:
    raise SystemExit(f"error: {e}")
  from unclip_jax.models.layers import REMAT_POLICIES

  remats = [r.strip() for r in args.remat.split(",") if r.strip()]
  bad = [r for r in remats if r not in REMAT_POLICIES]
  if bad or not remats:
    raise SystemExit(f"error: --remat must be comma-separated policies from {REMAT_POLICIES}, got {args.remat!r}")
  info = common.device_info()
  dtype = args.dtype or common.default_dtype(info["platform"])
  rows = []
  for stage in stages:
    for b in batches or [DEFAULT_BATCH[args.size][stage]]:
      for remat in remats:
        rows.append(bench_one(stage, args.size, b, dtype, remat, args.repeats, args.seed, info,
                              compile_only=args.compile_only))
  print(f"\n## one training step per stage, size {args.size}, device {info['kind']} ({info['platform']}), "
        f"peak {common.fmt(info['peak_flops'], '.0f', 1e-12)} TFLOP/s bf16\n")
  print(table(rows))
  if args.json:
    common.write_json(args.json, {"benchmark": "train_step", "device": info, "results": rows})
  return 0


if __name__ == "__main__":
  sys.exit(main())
