"""What a TPU compile spends on one UNet 3x3 conv, compile only: GroupNorm -> SiLU -> conv, forward and
forward + backward, at the Karlo decoder's per-level shapes.

The decoder train step's TPU compile is dominated by the TPU backend's code generation for convolutions (bench/
NOTES.md, "TPU, compile only"): the conv emitter unrolls a loop body whose size follows the tile it fits into
scoped VMEM, and the LLO passes (scheduling, register allocation) grow faster than linearly with that body. This
script measures it per conv layer, for

  impl   xla     the project's layers.conv (nn.Conv -> one XLA convolution)
         im2col  the same kernel [3, 3, Cin, Cout] as one dot over the 9 shifted copies of the input (a
                 comparison lowering; not used by the models)

and any libtpu flag sets (`--flags 'default=;vmem8m=--xla_tpu_scoped_vmem_limit_kib=8192'`, each in its own
process since libtpu reads LIBTPU_INIT_ARGS once). Columns: compile s (wall) and CPU s (all threads), the cost
model's estimated seconds (`optimal_seconds`, an estimate) and, with `--llo`, a static estimate from the generated
code: per conv kernel, bundles (VLIW instruction words) × the trip counts of the loops around them, summed over
the program's conv kernels, and the largest loop body (bundles) — the quantity the compile time follows. The
static count leaves out DMA stalls and is a heuristic (one loop level is resolved); it compares kernels of the
same op, nothing more.

  python bench/tpu_conv_compile.py [--topology v5p:2x2x1] [--batch 8] [--shapes 320x64,640x32,960x16,1280x8]
      [--impl xla,im2col] [--flags 'default='] [--llo] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

KARLO_LEVELS = "320x64,640x32,960x16,1280x8"     # configs/decoder.py:karlo block_out_channels x resolution
GROUPS = 32


def parse_shapes(text: str) -> list[tuple[int, int]]:
  """'320x64,640x32' -> [(channels, size), ...]."""
  out = []
  for part in text.split(","):
    m = re.fullmatch(r"\s*(\d+)x(\d+)\s*", part)
    if not m:
      raise SystemExit(f"--shapes: expected CHANNELSxSIZE items like 320x64, got {part!r}")
    out.append((int(m.group(1)), int(m.group(2))))
  return out


def parse_flag_sets(text: str) -> list[tuple[str, str]]:
  """'default=;vmem8m=--a=1 --b=2' -> [(name, LIBTPU_INIT_ARGS), ...]."""
  out = []
  for part in text.split(";"):
    if "=" not in part:
      raise SystemExit(f"--flags: expected NAME=FLAGS items separated by ';', got {part!r}")
    name, flags = part.split("=", 1)
    out.append((name.strip(), flags.strip()))
  return out


# ---- static estimate from the TPU backend's final bundles ---------------------------------------------------------
_BUNDLE = re.compile(r"^\s*(0x[0-9a-f]+|\d+)\s+(LB:)?")
_EXIT = re.compile(r"scmp\.ge\.s32\.totalorder %s\w+, (\d+) /\* loop exit test \*/")


def static_cycles(text: str) -> tuple[int, int]:
  """(bundles weighted by loop trip counts, largest loop body in bundles) of one kernel's final bundles dump."""
  bundles = [(bool(m.group(2)), line) for line in text.splitlines() if "{" in line
             for m in [_BUNDLE.match(line)] if m]
  weight, open_loops, largest = [1] * len(bundles), [], 0
  for i, (loop_body, line) in enumerate(bundles):
    if loop_body:
      open_loops.append(i)
    m = _EXIT.search(line)
    if m and open_loops:
      start = open_loops.pop()
      end = next((j for j in range(i, min(len(bundles), i + 8)) if "sbr.rel" in bundles[j][1]), i)
      largest = max(largest, end - start + 1)
      for j in range(start, end + 1):
        weight[j] *= int(m.group(1))
  return sum(weight), largest


def llo_conv_stats(dump_dir: str, program: str) -> dict:
  """Sums static_cycles over the conv (or, for im2col, dot) kernels of `program` (by the jit name in their
  op_name)."""
  cycles = kernels = largest = 0
  names = os.listdir(dump_dir)
  for f in names:
    if not f.endswith("-schedule-analysis_final_bundles.txt"):
      continue
    head = open(os.path.join(dump_dir, f)).read(20000)
    m = re.search(r'op_name="([^"]+)"', head)
    op = m.group(1) if m else ""
    if not op.startswith(f"jit({program})") or not re.search(r"conv_general_dilated|dot_general", op):
      continue
    bundles = f.replace("-schedule-analysis_final_bundles.txt", "")
    bundles = next((n for n in names if n.startswith(bundles.rsplit("-", 1)[0]) and n.endswith("-final_bundles.txt")
                    and "schedule" not in n), None)
    if bundles is None:
      continue
    c, big = static_cycles(open(os.path.join(dump_dir, bundles)).read())
    cycles, kernels, largest = cycles + c, kernels + 1, max(largest, big)
  return {"llo_conv_cycles": cycles, "llo_conv_kernels": kernels, "llo_largest_loop_bundles": largest}


# ---- one process: every shape for one flag set and implementation -------------------------------------------------
def conv_module(impl: str, features: int, dtype):
  """The layer under test: layers.conv itself, or the im2col lowering with the same params."""
  import flax.linen as nn
  import jax.numpy as jnp

  from unclip_jax.models import layers

  if impl == "xla":
    return layers.conv(features, 3, dtype, "conv")

  class Im2colConv(nn.Module):
    @nn.compact
    def __call__(self, x):
      ref = layers.conv(features, 3, dtype, "conv")          # same param names, shapes, init and axes
      kernel = self.param("kernel", ref.kernel_init, (3, 3, x.shape[-1], features), jnp.float32)
      bias = self.param("bias", ref.bias_init, (features,), jnp.float32)
      b, h, w, c = x.shape
      xp = jnp.pad(x.astype(dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
      cols = jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)], axis=-1)
      return jnp.einsum("bhwk,ko->bhwo", cols, kernel.astype(dtype).reshape(9 * c, features)) + bias.astype(dtype)

  return Im2colConv()


def run_one(args) -> list[dict]:
  from unclip_jax import preflight

  dump = os.environ.get("UNCLIP_BENCH_LLO_DUMP")
  chip, devices = preflight.abstract_devices(args.topology)
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from unclip_jax.models import layers
  from unclip_jax.parallel import mesh as mesh_lib

  mesh = mesh_lib.make_mesh({"data": len(devices)}, devices)
  rows_sh, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  dt = jnp.dtype(args.dtype)
  out = []
  for channels, size in parse_shapes(args.shapes):
    class Layer(nn.Module):
      @nn.compact
      def __call__(self, x):
        h = nn.silu(layers.group_norm(GROUPS, dt, "norm")(x))
        return conv_module(args.impl[0], channels, dt)(h)

    layer = Layer()
    x = jax.ShapeDtypeStruct((args.batch * len(devices), size, size, channels), jnp.float32, sharding=rows_sh)
    params = jax.eval_shape(lambda x: nn.unbox(layer.init(jax.random.key(0), x)["params"]), x)
    params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=whole), params)

    def fwd(p, x):
      return layer.apply({"params": p}, x)

    def fwd_bwd(p, x):
      return jax.grad(lambda p, x: jnp.sum(fwd(p, x).astype(jnp.float32) ** 2), argnums=(0, 1))(p, x)

    for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
      with jax.set_mesh(mesh):
        lowered = jax.jit(fn).lower(params, x)
        t0, c0 = time.perf_counter(), time.process_time()
        compiled = lowered.compile()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
      row = preflight.measure(compiled, compile_s=wall)
      row.update(channels=channels, size=size, program=name, impl=args.impl[0], flags=args.flag_name,
                 compile_cpu_s=cpu, topology=args.topology, batch_per_chip=args.batch)
      if dump:
        row.update(llo_conv_stats(dump, name))
        for f in os.listdir(dump):                       # the next program's kernels only
          os.remove(os.path.join(dump, f))
      out.append(row)
      print(f"[bench] {args.flag_name} {args.impl[0]} {channels}ch {size}² {name}: compile {wall:.1f}s "
            f"(CPU {cpu:.1f}s)", file=sys.stderr, flush=True)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--topology", default="v5p:2x2x1")
  p.add_argument("--batch", type=int, default=8, help="rows per chip")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--shapes", default=KARLO_LEVELS, help="CHANNELSxSIZE,... (Cin = Cout)")
  p.add_argument("--impl", default="xla,im2col")
  p.add_argument("--flags", default="default=", help="NAME=LIBTPU_INIT_ARGS;... one process per set")
  p.add_argument("--llo", action="store_true", help="dump the generated code and add the static estimate")
  p.add_argument("--json", default=None)
  p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--flag-name", default="default", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.impl = [i.strip() for i in args.impl.split(",")]
  if bad := [i for i in args.impl if i not in ("xla", "im2col")]:
    raise SystemExit(f"--impl: unknown {bad}; use xla, im2col")
  parse_shapes(args.shapes)
  if args.one:
    print("ROWS " + json.dumps(run_one(args), default=str))
    return 0
  rows = []
  for flag_name, flags in parse_flag_sets(args.flags):
    for impl in args.impl:
      with tempfile.TemporaryDirectory() as dump:
        env = dict(os.environ, LIBTPU_INIT_ARGS=flags)
        if args.llo:
          env["LIBTPU_INIT_ARGS"] = (f"{flags} --xla_jf_dump_to={dump} --xla_jf_dump_llo_text=true "
                                     "--xla_jf_dump_llo_pass_label_regex=final_bundles").strip()
          env["UNCLIP_BENCH_LLO_DUMP"] = dump
        cmd = [sys.executable, os.path.abspath(__file__), "--one", "--flag-name", flag_name, "--impl", impl,
               "--topology", args.topology, "--batch", str(args.batch), "--dtype", args.dtype,
               "--shapes", args.shapes]
        res = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
        rows += json.loads(next(line for line in res.stdout.splitlines() if line.startswith("ROWS "))[5:])
  print(f"{args.topology}, {args.batch} rows/chip, {args.dtype}; GroupNorm({GROUPS}) -> SiLU -> 3x3 conv "
        "(Cin = Cout), compile only")
  print(common.markdown_table(
      ("channels", "size", "program", "impl", "libtpu flags", "compile s", "compile CPU s", "est. s (cost model)",
       "static LLO Mcycles, conv/dot kernels (est.)", "largest loop body (bundles)"),
      [(r["channels"], f"{r['size']}²", r["program"], r["impl"], r["flags"], f"{r['compile_s']:.1f}",
        f"{r['compile_cpu_s']:.1f}", common.fmt(r["est_seconds"], ".3g"),
        common.fmt(r.get("llo_conv_cycles") or None, ".3f", 1e-6), r.get("llo_largest_loop_bundles") or "-")
       for r in rows]))
  if args.json:
    common.write_json(args.json, {"topology": args.topology, "batch_per_chip": args.batch, "rows": rows})
  return 0


if __name__ == "__main__":
  sys.exit(main())
