"""How the TPU compile time of the decoder train step grows with UNet depth (levels, res blocks per level) and width.

Every level and res block is unrolled into the HLO (no nn.scan), so compile time grows linearly with the block
count (`--sweep depth`, micro width: 8 channels, attention only in the mid block). `--sweep width` (one level, one
block, 16², 1 row per chip) grows faster than linearly with the channels: the TPU backend's conv kernels unroll a
body that fills scoped VMEM (bench/tpu_conv_compile.py measures one conv layer). The TPU is abstract (needs
libtpu).

  python bench/tpu_compile_scaling.py [--sweep depth|width|all] [--topology v5e:2x2] [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

SWEEPS = {   # (levels, layers_per_block, channels)
    "depth": ((1, 1, 8), (2, 1, 8), (3, 1, 8), (4, 1, 8), (2, 2, 8), (2, 4, 8)),
    "width": ((1, 1, 8), (1, 1, 64), (1, 1, 256), (1, 1, 512), (1, 1, 1024)),
}


def overrides(levels: int, layers: int, width: int = 8) -> list[str]:
  return [f"model.block_out_channels={(width,) * levels!r}", f"model.attention_levels={(False,) * levels!r}",
          f"model.layers_per_block={layers}", "model.norm_num_groups=4", "model.image_size=16", "batch_size=4",
          f"model.head_dim={min(width, 64)}", f"model.cross_attention_dim={max(width, 24)}"]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--topology", default="v5e:2x2")
  p.add_argument("--sweep", default="depth", choices=("depth", "width", "all"))
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  from unclip_jax import config_lib, preflight

  preflight.prepare_env()
  warm = config_lib.load_config(f"{common.CONFIG_DIR / 'decoder.py'}:tiny", overrides(1, 1))
  preflight.train_preflight(warm, args.topology)        # libtpu start-up and first-compile costs, not counted
  rows = []
  variants = SWEEPS["depth"] + SWEEPS["width"][1:] if args.sweep == "all" else SWEEPS[args.sweep]
  for levels, layers, width in variants:
    cfg = config_lib.load_config(f"{common.CONFIG_DIR / 'decoder.py'}:tiny", overrides(levels, layers, width))
    row = preflight.train_preflight(cfg, args.topology)
    row.update(levels=levels, layers_per_block=layers, width=width, res_blocks=levels * (2 * layers + 1) + 2)
    rows.append(row)
    print(f"[bench] levels {levels} x {layers} blocks x {width} ch: compile {row['compile_s']:.1f}s", file=sys.stderr,
          flush=True)
  print(common.markdown_table(
      ("levels", "res blocks/level (down)", "channels", "res blocks total", "params", "compile s", "compile CPU s",
       "code MiB", "GFLOP/step"),
      [(r["levels"], r["layers_per_block"], r["width"], r["res_blocks"], r["params"], f"{r['compile_s']:.1f}",
        f"{r['compile_cpu_s']:.1f}",
        f"{r['code_bytes'] / 2 ** 20:.1f}", common.fmt(r["flops"], ".3g", 1e-9)) for r in rows]))
  if args.json:
    common.write_json(args.json, {"topology": args.topology, "rows": rows})
  return 0


if __name__ == "__main__":
  sys.exit(main())
