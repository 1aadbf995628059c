"""XLA vs Pallas splash attention on TPU, compile only: temporaries and the cost model's estimated time of one
attention layer, forward + backward, at the Karlo decoder's 32² shape.

The Karlo decoder's 32² level (configs/decoder.py:karlo, level 1): 640 channels, head_dim 64 -> 10 heads,
1024 queries, keys = 81 text tokens (4 CLIP tokens + 77, key-padding mask) + 1024 spatial = 1105. Two programs
per implementation, each the gradient of a scalar of the output (so forward + backward), bf16 compute:

  core   q, k, v [B, T, 10, 64] -> attention (the part the kernel replaces)
  layer  the whole `AddedKVAttention` (GroupNorm, projections, attention, output projection, residual), as the
         UNet runs it, gradients w.r.t. its params, x and the text tokens

compiled for an abstract TPU slice (libtpu, `jax.experimental.topologies`) under a ("data",) mesh with `batch`
rows per chip. The cost model does not see inside a Pallas kernel (splash gives XLA no cost estimate), so its
estimate for splash leaves the kernels out; the table adds their own matmul FLOPs (forward 4·T·S·D per head, the
dq kernel 6·T·S·D, the dk/dv kernel 8·T·S·D, padded lengths) at the chip's bf16 peak as a lower bound: both
columns are estimates.

  python bench/tpu_attention.py [--topology v5p:2x2x1] [--batch 8] [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

KARLO_32 = dict(size=32, channels=640, head_dim=64, tokens=81, context_dim=1536, groups=32)


def splash_kernel_flops(batch: int, heads: int, tq: int, tk: int, head_dim: int) -> float:
  """Matmul FLOPs of the splash kernels (forward, dq, dk/dv) at the lengths padded to the kernel's block."""
  from unclip_jax.models import layers

  pad = lambda n: -(-n // layers.SPLASH_BLOCK) * layers.SPLASH_BLOCK
  return 18.0 * batch * heads * pad(tq) * pad(tk) * head_dim


def programs(impl: str, mesh, batch: int, dtype: str, shape: dict):
  """{name: (jitted fn, abstract args)} of the core and layer programs for one implementation."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from unclip_jax.models import layers, unet as unet_lib

  dt = jnp.dtype(dtype)
  s, c, d, t, dc = shape["size"], shape["channels"], shape["head_dim"], shape["tokens"], shape["context_dim"]
  h = c // d
  rows, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  sds = lambda shp, dtype_, sh=rows: jax.ShapeDtypeStruct(shp, dtype_, sharding=sh)

  def core(q, k, v, keep):
    if impl == "splash":
      return layers.splash_attention(q, k, v, keep)
    bias = layers.attention_bias_from_mask(keep)[:, None, None, :]
    return layers.dot_product_attention(q, k, v, bias, implementation="xla")

  def core_grad(q, k, v, keep):
    return jax.grad(lambda *a: jnp.sum(core(*a, keep).astype(jnp.float32) ** 2), argnums=(0, 1, 2))(q, k, v)

  kv = s * s + t
  core_args = (sds((batch, s * s, h, d), dt), sds((batch, kv, h, d), dt), sds((batch, kv, h, d), dt),
               sds((batch, kv), jnp.bool_))
  layer = unet_lib.AddedKVAttention(head_dim=d, groups=shape["groups"], attention=impl, dtype=dt)
  x, ctx, mask = sds((batch, s, s, c), jnp.float32), sds((batch, t, dc), jnp.float32), sds((batch, t), jnp.bool_)
  params = jax.eval_shape(lambda *a: nn.unbox(layer.init(jax.random.key(0), *a)["params"]), x, ctx, mask)
  params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=whole), params)

  def layer_grad(p, x, ctx, mask):
    loss = lambda p, x, ctx: jnp.sum(layer.apply({"params": p}, x, ctx, mask).astype(jnp.float32) ** 2)
    return jax.grad(loss, argnums=(0, 1, 2))(p, x, ctx)

  return {"core": (jax.jit(core_grad), core_args), "layer": (jax.jit(layer_grad), (params, x, ctx, mask))}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--topology", default="v5p:2x2x1")
  p.add_argument("--batch", type=int, default=8, help="rows per chip")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--impl", default="xla,splash")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  from unclip_jax import config_lib, preflight

  chip, devices = preflight.abstract_devices(args.topology)
  import flax.linen as nn
  import jax

  from unclip_jax.parallel import mesh as mesh_lib

  mesh = mesh_lib.make_mesh({"data": len(devices)}, devices)
  batch = args.batch * len(devices)
  sh = KARLO_32
  heads = sh["channels"] // sh["head_dim"]
  kernel_flops = splash_kernel_flops(args.batch, heads, sh["size"] ** 2, sh["size"] ** 2 + sh["tokens"],
                                     sh["head_dim"])
  rows = []
  for impl in args.impl.split(","):
    with jax.set_mesh(mesh), nn.logical_axis_rules(config_lib.AXIS_RULES):
      for name, (fn, fn_args) in programs(impl, mesh, batch, args.dtype, sh).items():
        t0 = time.perf_counter()
        compiled = fn.lower(*fn_args).compile()
        row = preflight.measure(compiled, compile_s=time.perf_counter() - t0)
        row.update(program=name, impl=impl, topology=args.topology, batch_per_chip=args.batch)
        kernels = row["pallas_kernels"] or 0
        row["kernel_flops_per_chip"] = kernel_flops if kernels else 0.0
        row["kernel_s_at_peak"] = row["kernel_flops_per_chip"] / chip.peak_flops
        est = row["est_seconds"]
        row["est_plus_kernel_s"] = None if est is None else est + row["kernel_s_at_peak"]
        rows.append(row)
        print(f"[bench] {name} {impl}: compile {row['compile_s']:.1f}s", file=sys.stderr, flush=True)
  print(f"{args.topology}, {len(devices)} chips, batch {args.batch}/chip, {args.dtype}; one Karlo 32² attention "
        f"layer ({heads} heads x {sh['head_dim']}, {sh['size'] ** 2} queries, {sh['size'] ** 2 + sh['tokens']} keys "
        "with a text key mask), forward + backward")
  print(common.markdown_table(
      ("program", "attention", "temp MiB/chip", "total MiB/chip", "Pallas kernels", "est. s (cost model)",
       "kernel s at peak (est.)", "est. s total", "compile s"),
      [(r["program"], r["impl"], common.fmt(r["temp_bytes"], ".1f", 2 ** -20),
        common.fmt(r["total_bytes"], ".1f", 2 ** -20), r["pallas_kernels"], common.fmt(r["est_seconds"], ".3g"),
        common.fmt(r["kernel_s_at_peak"], ".3g"), common.fmt(r["est_plus_kernel_s"], ".3g"),
        f"{r['compile_s']:.1f}") for r in rows]))
  if args.json:
    common.write_json(args.json, {"topology": args.topology, "dtype": args.dtype, "rows": rows})
  return 0


if __name__ == "__main__":
  sys.exit(main())
