"""The TPU table: every stage's train step at Karlo and paper sizes, compiled for four TPU slices (no TPU needed).

Each row runs the training preflight (`python -m unclip_jax.train --compile_only`, README "TPU preflight") in its
own process and climbs a ladder until the program fits the chips' HBM: remat "none", then "full", then the same
effective batch in 2, 4, 8, ... gradient-accumulation micro-steps (`optim.grad_accum`; the compiled program is one
micro-step). The mesh is FSDP over every chip of the slice (`mesh.fsdp = chips`, `mesh.data = 1`). Effective
batch: the paper's global batch for paper sizes (Ramesh et al. 2022, Appendix C, Table 3: decoder 2048, 64→256
1024, 256→1024 512, priors 4096), 8 rows per chip for Karlo sizes (stated in every row). Step time and MFU are the
TPU compiler's cost-model **estimates** for one micro-step (no TPU ran anything).

The sampling rows compile the Karlo chain (`python -m unclip_jax.sample --compile-only --configs karlo`: text
tower, prior, decoder and super-res scans, weights replicated, bf16) at a stated batch; the chain's row is all
weights resident plus the largest stage's other memory.

Rows run in priority order (`--list` shows it): the targets first (paper sizes on v5p:4x4x4, the Karlo chain on
one v5e chip), transformer stages before UNets within a topology. Results are appended to a JSON-lines file, one
line per finished row (attempts, commands, the preflight's fields; appends are locked, so two processes with
disjoint `--only` can fill one file on a 2-core host), and a stopped run continues where it was (`--redo`
recompiles). `--markdown` prints the table of a results file.

  python bench/tpu_table.py --list
  python bench/tpu_table.py [--only REGEX] [--out bench/tpu_table.jsonl] [--timeout 3600]
  python bench/tpu_table.py --markdown [--out bench/tpu_table.jsonl]
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOPOLOGIES = ("v5e:2x4", "v5p:2x2x1", "v5p:4x4x4", "v6e:2x4")
KARLO_ROWS_PER_CHIP = 8
MAX_ACCUM = 64


@dataclasses.dataclass(frozen=True)
class Stage:
  """A stage config and its effective batch (None: KARLO_ROWS_PER_CHIP × chips)."""
  config: str
  size: str                      # "karlo", "paper" or "reference"
  paper_batch: int | None = None
  note: str = ""
  sample_batch: int | None = None   # set: a sampling chain (`config` is a --configs preset) at this batch
  topologies: tuple[str, ...] = TOPOLOGIES


STAGES = (
    Stage("decoder:karlo", "karlo"),
    Stage("decoder:paper", "paper", 2048, "the paper's decoder: UNet + GLIDE text transformer + CLIP projections"),
    Stage("upsampler:karlo_64_256", "karlo"),
    Stage("upsampler:paper_64_256", "paper", 1024),
    Stage("upsampler:paper_256_1024", "paper", 512),
    Stage("prior:karlo", "karlo"),
    Stage("prior:paper", "paper", 4096),
    Stage("ar_prior:paper", "paper", 4096),
    Stage("clip:vit_l14", "karlo", None, "Karlo's CLIP (ViT-L/14)"),
    Stage("clip:vit_h16", "paper", None, "the paper's ViT-H/16 CLIP; no paper batch (pretrained in the paper)"),
    Stage("clip:vit_b32", "reference", None, "a reference compile (ViT-B/32 CLIP train step) to judge the others' "
          "compile times on a shared host", topologies=("v5p:4x4x4",)),
    Stage("karlo", "karlo", None, "the Karlo sampling chain (text, prior, decoder, super-res to 256²), float32 "
          "weights as bundles load", sample_batch=8, topologies=("v5e:1x1",)),
    Stage("karlo:bf16", "karlo", None, "the Karlo sampling chain with bfloat16 weights", sample_batch=8,
          topologies=("v5e:1x1",)),
)
# Execution order: the targets first, then by topology, cheap (transformer) compiles before UNets.
TOPOLOGY_ORDER = ("v5p:4x4x4", "v5e:1x1", "v5p:2x2x1", "v5e:2x4", "v6e:2x4")
COST_ORDER = ("sample", "prior", "ar_prior", "clip", "upsampler", "decoder")


def stage_kind(stage: Stage) -> str:
  return "sample" if stage.sample_batch else stage.config.split(":")[0]


def all_rows() -> list[tuple[Stage, str]]:
  """Every (stage, topology) row, in the order they are compiled."""
  rows = [(s, t) for s in STAGES for t in s.topologies]
  key = lambda r: (not (r[0].size == "paper" and r[1] == "v5p:4x4x4" or r[0].sample_batch),
                   TOPOLOGY_ORDER.index(r[1]), COST_ORDER.index(stage_kind(r[0])), r[0].size != "paper")
  return sorted(rows, key=key)


def chip_count(topology: str) -> int:
  return math.prod(int(d) for d in topology.split(":")[1].split("x"))


def row_name(stage: Stage, topology: str) -> str:
  return f"sample:{stage.config}@{topology}" if stage.sample_batch else f"{stage.config}@{topology}"


def effective_batch(stage: Stage, chips: int) -> int:
  return stage.sample_batch or stage.paper_batch or KARLO_ROWS_PER_CHIP * chips


def ladder(stage: Stage, chips: int):
  """(remat, micro-batch, grad_accum) to try in order, all with the same effective batch."""
  effective = effective_batch(stage, chips)
  if stage.sample_batch:                # sampling: one attempt (no optimizer state, no remat)
    yield "-", effective, 1
    return
  yield "none", effective, 1
  k = 1
  while k <= MAX_ACCUM and effective % (k * chips) == 0:
    yield "full", effective // k, k
    k *= 2


def command(stage: Stage, topology: str, remat: str, batch: int, accum: int, workdir: str) -> list[str]:
  if stage.sample_batch:
    preset, _, weights = stage.config.partition(":")
    return [sys.executable, "-m", "unclip_jax.sample", "--compile-only", "--configs", preset, "--topology",
            topology, "--batch", str(batch), "--param-dtype", "bfloat16" if weights == "bf16" else "float32"]
  return [sys.executable, "-m", "unclip_jax.train", "--config", stage.config, "--workdir", workdir, "--compile_only",
          "--topology", topology, f"--config.mesh.fsdp={chip_count(topology)}", "--config.mesh.data=1",
          f"--config.batch_size={batch}", f"--config.optim.grad_accum={accum}", f"--config.remat_policy={remat}"]


def shell(cmd: list[str]) -> str:
  """The command as a user would type it (python -m ..., no absolute interpreter path, no temp workdir)."""
  args = ["python"] + cmd[1:]
  if "--workdir" in args:
    args[args.index("--workdir") + 1] = "/tmp/pf"
  return " ".join(args)


def run_attempt(cmd: list[str], timeout: float) -> dict:
  """One preflight process -> its row (with `returncode`), or {'error': ...} when it printed none."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_ACCELERATOR_TYPE=os.environ.get("TPU_ACCELERATOR_TYPE", "v5p-8"))
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
  return parse_output(proc.stdout, proc.stderr, proc.returncode, time.perf_counter() - t0)


def parse_output(stdout: str, stderr: str, returncode: int, wall_s: float | None) -> dict:
  """A preflight's printed output -> its row. A sampling chain prints one row per stage and the chain last: the
  chain is the table's row, the stages are kept beside it."""
  objs = [json.loads(l) for l in stdout.splitlines() if l.startswith("{") and '"preflight": [' in l]
  rows = [o["preflight"] for o in objs if "preflight" in o]
  if not rows:
    tail = [l for l in stderr.splitlines() if l.strip()][-3:]
    return {"error": f"exit {returncode}: " + " / ".join(tail)[-600:], "wall_s": wall_s}
  return dict(rows[0][-1], stages=rows[0][:-1], returncode=returncode, wall_s=wall_s)


def run_row(stage: Stage, topology: str, timeout: float) -> dict:
  chips = chip_count(topology)
  attempts = []
  with tempfile.TemporaryDirectory() as workdir:
    for remat, batch, accum in ladder(stage, chips):
      cmd = command(stage, topology, remat, batch, accum, workdir)
      print(f"  {shell(cmd)}", flush=True)
      result = run_attempt(cmd, timeout)
      result.update(remat=remat, micro_batch=batch, grad_accum=accum, command=shell(cmd))
      attempts.append(result)
      fits = result.get("fits")
      print(f"    -> {'FITS' if fits else 'DOES NOT FIT' if 'fits' in result else result['error']} "
            f"({result['wall_s']:.0f} s)", flush=True)
      if fits or "error" in result:     # fits, or no row at all (timed out, crashed): climbing will not help
        break
  return result_row(stage, topology, attempts)


def result_row(stage: Stage, topology: str, attempts: list[dict]) -> dict:
  """The table's record of a row: its last attempt is the row."""
  chips = chip_count(topology)
  best = attempts[-1]
  return {"name": row_name(stage, topology), "config": row_name(stage, topology).split("@")[0], "size": stage.size,
          "topology": topology, "chips": chips, "effective_batch": effective_batch(stage, chips), "note": stage.note,
          "fits": bool(best.get("fits")), "row": best, "attempts": attempts}


def read(path: pathlib.Path) -> dict[str, dict]:
  if not path.exists():
    return {}
  return {r["name"]: r for r in (json.loads(l) for l in path.read_text().splitlines() if l.strip())}


def append(path: pathlib.Path, result: dict) -> None:
  """One line per row, locked, flushed and fsynced: a stopped run loses at most the row in progress."""
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    f.write(json.dumps(result, sort_keys=True) + "\n")
    f.flush()
    os.fsync(f.fileno())
    fcntl.flock(f, fcntl.LOCK_UN)


def _g(x, fmt):
  return "-" if x is None else format(x, fmt)


def _collectives(r: dict) -> str:
  """'AG 1.2 · RS 0 · AR 340 · A2A 0.1' MiB per chip (kinds with bytes), or '-' for rows measured without them."""
  c = r.get("collectives")
  if not c:
    return "-"
  short = {"all-gather": "AG", "reduce-scatter": "RS", "all-reduce": "AR", "all-to-all": "A2A",
           "collective-permute": "CP"}
  return " · ".join(f"{short[k]} {v['bytes'] / 2 ** 20:.3g}" for k, v in c.items() if v["count"]) or "none"


def markdown(results: dict[str, dict]) -> str:
  cols = ("stage", "topology", "chips", "mesh", "batch (micro × accum)", "remat", "params", "total GiB/chip",
          "HBM GiB", "TFLOP/micro-step", "est. step s", "est. MFU", "collectives MiB/chip", "compile s",
          "compile CPU s", "fits")
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  order = {row_name(s, t): i for i, (s, t) in enumerate((s, t) for s in STAGES for t in s.topologies)}
  for name in sorted(results, key=lambda n: order.get(n, 1 << 30)):
    res = results[name]
    r = res["row"]
    if "error" in r:
      cells = (res["config"], res["topology"], res["chips"], "-", f"{res['effective_batch']}", r["remat"], "-", "-",
               "-", "-", "-", "-", "-", "-", "-", r["error"][:80])
    else:
      cells = (res["config"], res["topology"], res["chips"], r["mesh"],
               f"{res['effective_batch']} ({r['micro_batch']} × {r['grad_accum']})", r["remat"],
               "-" if r.get("params") is None else f"{r['params'] / 1e9:.3g} B", _g(r["total_bytes"] / 2 ** 30, ".2f"), _g(r["hbm_bytes"] / 2 ** 30, ".0f"),
               _g(None if r["flops"] is None else r["flops"] / 1e12, ".4g"), _g(r["est_seconds"], ".3g"),
               _g(r["est_mfu"], ".1%"), _collectives(r), _g(r["compile_s"], ".0f"), _g(r.get("compile_cpu_s"), ".0f"),
               "FITS" if r["fits"] else "DOES NOT FIT")
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=str(ROOT / "bench" / "tpu_table.jsonl"))
  p.add_argument("--only", default=None, help="regex on row names (config@topology)")
  p.add_argument("--timeout", type=float, default=3600.0, help="seconds per compile attempt")
  p.add_argument("--redo", action="store_true", help="recompile rows already in --out")
  p.add_argument("--list", action="store_true", help="print the row names and exit")
  p.add_argument("--markdown", action="store_true", help="print the table of --out and exit")
  p.add_argument("--record", nargs=5, metavar=("ROW", "REMAT", "MICRO_BATCH", "ACCUM", "STDOUT_FILE"),
                 help="record a row from the saved output of a preflight run by hand (its command as the ladder "
                      "would build it; wall time from the file's age is not known, so it is left out)")
  args = p.parse_args(argv)
  out = pathlib.Path(args.out)
  rows = [(s, t) for s, t in all_rows() if not args.only or re.search(args.only, row_name(s, t))]
  if args.markdown:
    print(markdown(read(out)))
    return 0
  if args.record:
    name, remat, batch, accum, file = args.record
    match = [(s, t) for s, t in all_rows() if row_name(s, t) == name]
    if not match:
      print(f"error: no row {name!r} (see --list)", file=sys.stderr)
      return 2
    stage, topology = match[0]
    result = parse_output(pathlib.Path(file).read_text(), "", 0, None)
    cmd = command(stage, topology, remat, int(batch), int(accum), "/tmp/pf")
    result.update(remat=remat, micro_batch=int(batch), grad_accum=int(accum), command=shell(cmd))
    append(out, result_row(stage, topology, [result]))
    print(markdown({name: read(out)[name]}))
    return 0
  if args.list:
    print("\n".join(row_name(s, t) for s, t in rows))
    return 0
  if not rows:
    print(f"error: --only {args.only!r} matches no row (see --list)", file=sys.stderr)
    return 2
  done = read(out)
  for stage, topology in rows:
    name = row_name(stage, topology)
    if name in done and not args.redo:
      continue
    print(f"{name}:", flush=True)
    append(out, run_row(stage, topology, args.timeout))
  print(markdown({k: v for k, v in read(out).items() if re.search(args.only or "", k)}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
