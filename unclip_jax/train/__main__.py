"""`python -m unclip_jax.train --config <stage>:<variant> --workdir DIR [--config.key=value ...]`

Trains any stage on one CPU, one GPU or a TPU pod slice, unchanged. Resumes from DIR's latest checkpoint.
`--config` takes a built-in config (`decoder:karlo`, `prior.py:shapes`; they ship with the package) or a path to a
config file (`configs/decoder.py:tiny`, `my_configs/x.py:variant`).
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "<stage>[:variant] (built-in) or path/to/config.py[:variant]",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, TensorBoard logs and samples go here")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "call jax.distributed.initialize(): 'auto' does when a multi-host launcher is detected")
flags.DEFINE_string("compilation_cache", os.environ.get("UNCLIP_JAX_CACHE", ""),
                    "persistent XLA compilation cache directory ('' disables)")
flags.DEFINE_bool("compile_only", False, "only compile the train step for --topology (abstract TPU chips, needs libtpu) "
                  "and print its per-chip memory, FLOPs and estimated step time; exits 1 if it does not fit")
flags.DEFINE_string("topology", None, "with --compile_only: TPU topology, e.g. v5p:2x2x1, v5e:16x16, v6e:4x4")
flags.DEFINE_integer("num_slices", 1, "with --compile_only: number of slices of --topology (multi-slice)")
flags.mark_flags_as_required(["config", "workdir"])

PREEMPTED_EXIT_CODE = 143     # 128 + SIGTERM, what an uncaught SIGTERM would have given
def main(argv):
  del argv
  if flags.FLAGS.compile_only:
    from unclip_jax import preflight

    sys.exit(preflight.train_main(flags.FLAGS.config, flags.FLAGS.topology, flags.FLAGS.num_slices))
  import jax  # after flag parsing: jax.distributed must come before any other JAX call

  logging.getLogger().setLevel(logging.INFO)
  from unclip_jax import distributed

  distributed.maybe_initialize(flags.FLAGS.distributed)
  from unclip_jax import compilation_cache

  compilation_cache.enable(compilation_cache.resolve(flags.FLAGS.compilation_cache))

  from unclip_jax.parallel import mesh as mesh_lib
  from unclip_jax import stages
  from unclip_jax.train import loop

  cfg = flags.FLAGS.config
  mesh = mesh_lib.make_mesh(dict(cfg.mesh))
  task = stages.make_task(cfg, mesh=mesh)
  state = loop.train(cfg, flags.FLAGS.workdir, task, mesh=mesh)
  if int(state.step) < cfg.num_train_steps:
    # Stopped early by SIGTERM (preemption): the checkpoint is saved; a non-zero status tells schedulers and
    # scripts the run is not finished (rerunning the same command resumes it).
    logging.warning("stopped %s at step %d of %d; rerun to resume", cfg.stage, int(state.step), cfg.num_train_steps)
    sys.exit(PREEMPTED_EXIT_CODE)
  logging.info("finished %s at step %d", cfg.stage, int(state.step))


def resolve_config_args(argv: list[str]) -> list[str]:
  """argv with `--config NAME` / `--config=NAME` of a built-in config replaced by its file path (config_flags reads
  files only). An unknown name is a clear error before anything starts."""
  from unclip_jax import config_lib

  out, i = [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config="):
      out.append("--config=" + config_lib.resolve_spec(arg[len("--config="):]))
    elif arg == "--config" and i + 1 < len(argv):
      out += [arg, config_lib.resolve_spec(argv[i + 1])]
      i += 1
    else:
      out.append(arg)
    i += 1
  return out


if __name__ == "__main__":
  try:
    resolved = resolve_config_args(sys.argv)
  except FileNotFoundError as e:
    sys.exit(f"error: {e}")
  app.run(main, argv=resolved)
