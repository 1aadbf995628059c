"""Compile-only TPU preflight: will this train step or sampling chain fit, and what will it cost, on a TPU slice
we do not have?

libtpu compiles for *abstract* chips (`jax.experimental.topologies`): the same sharded programs a real run would
build are lowered and compiled for a named topology (`v5p:2x2x1`, `v5e:16x16`, ...) on any machine, and XLA's
memory analysis (per-chip argument / output / temporary bytes) and cost analysis (FLOPs, the compiler's
estimated seconds) are read off. Nothing is allocated or run.

  python -m unclip_jax.train --config decoder:tiny --workdir DIR --compile_only --topology v5p:2x2x1
  python -m unclip_jax.sample --compile-only --topology v5e:2x2 --batch 8 [--bundle B]

Each prints a table row per program and one JSON line; the command exits 1 when a program does not fit in the
chip's HBM, 2 on bad input (an unknown topology, a mesh that does not divide it, a batch the data axes do not
divide), before anything is compiled. Needs libtpu (`pip install unclip_jax[tpu]`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Any, Callable, Sequence

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: the device_kind jax reports, HBM per chip, dense bf16 peak FLOP/s per chip."""
  generation: str
  device_kind: str
  hbm_bytes: int
  peak_flops: float


CHIPS = {
    "v4": Chip("v4", "TPU v4", 32 * GiB, 275e12),
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GiB, 197e12),
    "v5p": Chip("v5p", "TPU v5", 95 * GiB, 459e12),
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GiB, 918e12),
}
_TOPOLOGY_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}
_TOPOLOGY_RE = re.compile(r"^([a-z0-9]+):(\d+(?:x\d+)*)$")


class PreflightError(ValueError):
  """Bad preflight input (topology, mesh, batch), raised before anything is compiled."""


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
  """'v5p:2x2x1' -> (Chip, (2, 2, 1)); a PreflightError names the accepted forms."""
  m = _TOPOLOGY_RE.match(str(name).strip())
  forms = "v4:AxBxC, v5p:AxBxC, v5e:AxB, v6e:AxB (e.g. v5p:2x2x1, v5e:2x2, v5e:16x16, v6e:4x4, v4:2x2x2)"
  if not m or m.group(1) not in CHIPS:
    raise PreflightError(f"unknown TPU topology {name!r}; use {forms}")
  gen, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
  if len(dims) != _TOPOLOGY_DIMS[gen] or min(dims) < 1:
    raise PreflightError(f"TPU topology {name!r}: {gen} takes {_TOPOLOGY_DIMS[gen]} dimensions; use {forms}")
  return CHIPS[gen], dims


def prepare_env() -> None:
  """Environment for compiling against abstract chips from a host without TPUs: quiet libtpu's metadata probes,
  allow more than one libtpu process (a compile-only run claims no chip), and keep jax's own backend on CPU
  unless the caller chose one. Call before jax initialises a backend."""
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if not os.environ.get("JAX_PLATFORMS"):
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    try:
      jax.config.update("jax_platforms", "cpu")
    except Exception:                                   # a backend already exists: leave it
      pass


def libtpu_available() -> bool:
  """Whether libtpu (the TPU compiler) is installed."""
  import importlib.util

  return importlib.util.find_spec("libtpu") is not None


def abstract_devices(topology: str, num_slices: int = 1) -> tuple[Chip, list]:
  """The compile-only devices (one per chip) of `num_slices` slices of `topology`."""
  chip, dims = parse_topology(topology)
  if int(num_slices) < 1:
    raise PreflightError(f"--num_slices must be >= 1, got {num_slices}")
  if not libtpu_available():
    raise PreflightError("compile-only TPU preflight needs libtpu: pip install 'unclip_jax[tpu]'")
  prepare_env()
  from jax.experimental import topologies

  kwargs = {"num_slices": int(num_slices)} if int(num_slices) > 1 else {}
  if chip.generation == "v4":
    kwargs["chip_config_name"] = "megacore"          # one device per chip (both TensorCores), as v4 runs
  try:
    try:
      devices = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs).devices
    except Exception as e:                            # JaxRuntimeError: INVALID_ARGUMENT ...
      bounds = tuple(dims) + (1,) * (3 - len(dims))
      if "chips_per_host_bounds" not in str(e) or any(d > h for d, h in zip(bounds, (2, 2, 1))):
        raise
      # a slice smaller than one host's default 2x2x1 block (v5e:1x1, one chip): the slice is the whole host
      devices = topologies.get_topology_desc(topology_name=topology, platform="tpu", chips_per_host_bounds=bounds,
                                             **kwargs).devices
  except Exception as e:
    raise PreflightError(f"libtpu rejects TPU topology {topology!r}: {str(e).splitlines()[0]}") from None
  kind = devices[0].device_kind
  if kind != chip.device_kind:
    raise PreflightError(f"topology {topology!r} gave devices of kind {kind!r}, expected {chip.device_kind!r}")
  return chip, list(devices)


# ---- measuring one compiled program ----------------------------------------------------------------------------
def _cost(compiled) -> dict:
  try:
    cost = compiled.cost_analysis()
  except Exception:
    return {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def _positive(x) -> float | None:
  x = None if x is None else float(x)
  return x if x is not None and math.isfinite(x) and x > 0 else None


def _text(compiled) -> str | None:
  try:
    return compiled.as_text()
  except Exception:
    return None


def pallas_kernels(text: str | None) -> int | None:
  """How many Pallas TPU kernels (Mosaic `tpu_custom_call`s) a compiled program's HLO text calls; None without it."""
  return None if text is None else text.count('custom_call_target="tpu_custom_call"')


COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_COLLECTIVE_RE = re.compile(r"^\s*%\S+ = (.*?) (" + "|".join(COLLECTIVES) + r")(-start)?\(", re.M)
_SHAPE_RE = re.compile(r"\b(pred|[subf]\d+|bf16|f8e\w+)\[([\d,]*)\]")


def _shape_bytes(shape_text: str) -> int:
  """Bytes of an HLO shape ('bf16[4,320]{...}' or a tuple of them)."""
  total = 0
  for dtype, dims in _SHAPE_RE.findall(shape_text):
    size = 1 if dtype == "pred" else 2 if dtype == "bf16" else max(int(re.sub(r"\D", "", dtype) or 8) // 8, 1)
    total += size * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _top_level(tuple_text: str) -> list[str]:
  """'(a, (b, c), d)' -> ['a', '(b, c)', 'd']."""
  parts, depth, cur = [], 0, ""
  for ch in tuple_text.strip()[1:-1]:
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "," and depth == 0:
      parts.append(cur.strip())
      cur = ""
    else:
      cur += ch
  return parts + [cur.strip()] if cur.strip() else parts


def collectives(text: str | None) -> dict[str, dict[str, int]] | None:
  """{kind: {"count", "bytes"}} of the cross-chip collectives in a compiled program's HLO text; bytes are each
  op's result bytes per chip (an all-gather counts the gathered tensor, a reduce-scatter its shard; an async
  `-start` op's (operands, results, context) tuple counts its results). A combined (tuple) collective counts once
  with all its results."""
  if text is None:
    return None
  out = {k: {"count": 0, "bytes": 0} for k in COLLECTIVES}
  for shape, kind, start in _COLLECTIVE_RE.findall(text):
    if start and shape.startswith("("):
      parts = _top_level(shape)
      shape = parts[1] if len(parts) > 1 else shape
    out[kind]["count"] += 1
    out[kind]["bytes"] += _shape_bytes(shape)
  return out


def measure(compiled, *, compile_s: float) -> dict[str, Any]:
  """Per-chip memory, FLOPs per chip, the compiler's estimated seconds, the Pallas kernel calls and the collectives
  of one compiled program (the cost model does not see inside a Pallas kernel: its FLOPs and time are left out of
  the estimate)."""
  m = compiled.memory_analysis()
  cost = _cost(compiled)
  text = _text(compiled)
  args, out = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
  temp, alias = int(m.temp_size_in_bytes), int(m.alias_size_in_bytes)
  return {"argument_bytes": args, "output_bytes": out, "temp_bytes": temp, "alias_bytes": alias,
          "code_bytes": int(m.generated_code_size_in_bytes), "total_bytes": args + out + temp - alias,
          "flops_per_chip": _positive(cost.get("flops")), "est_seconds": _positive(cost.get("optimal_seconds")),
          "compile_s": compile_s, "pallas_kernels": pallas_kernels(text), "collectives": collectives(text)}


_OOM_RE = re.compile(r"required for ([\w ]+?) \(([\d.]+)([KMGTP]?)\) exceeds available HBM \(([\d.]+)([KMGTP]?)\)")
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40, "P": 2 ** 50}


def compile_or_oom(lowered, *, compile_s0: float | None = None) -> tuple[Any, dict[str, Any] | None]:
  """lowered.compile(), or (None, row) when the TPU compiler refuses a program that does not fit its HBM
  (RESOURCE_EXHAUSTED): the row has the compiler's message and the bytes it asked for."""
  t0 = time.perf_counter() if compile_s0 is None else compile_s0
  try:
    return lowered.compile(), None
  except Exception as e:                              # JaxRuntimeError
    msg = str(e).splitlines()[0] if str(e) else repr(e)
    if "RESOURCE_EXHAUSTED" not in msg:
      raise
    m = _OOM_RE.search(msg)
    need = int(float(m.group(2)) * _UNITS[m.group(3)]) if m else None
    return None, {"argument_bytes": None, "output_bytes": None, "temp_bytes": None, "alias_bytes": None,
                  "code_bytes": None, "total_bytes": need, "flops_per_chip": None, "est_seconds": None,
                  "compile_s": time.perf_counter() - t0, "compiler_error": msg}


def finish_row(row: dict[str, Any], chip: Chip, chips: int) -> dict[str, Any]:
  """Adds HBM, global FLOPs, estimated MFU (FLOPs / (est. s · peak · chips)) and the FITS verdict."""
  row = dict(row, hbm_bytes=chip.hbm_bytes, chips=chips, peak_flops_per_chip=chip.peak_flops)
  f, s = row.get("flops_per_chip"), row.get("est_seconds")
  row["flops"] = None if f is None else f * chips
  row["est_mfu"] = None if not (f and s) else f / (s * chip.peak_flops)
  row["fits"] = "compiler_error" not in row and row["total_bytes"] is not None and row["total_bytes"] <= chip.hbm_bytes
  return row


COLUMNS = ("program", "topology", "chips", "mesh", "batch", "args GiB/chip", "temp GiB/chip", "total GiB/chip",
           "HBM GiB/chip", "GFLOP/step", "est. step s", "est. MFU", "compile s", "fits")


def _f(x, spec):
  return "-" if x is None else format(x, spec)


def _gib(x):
  return None if x is None else x / GiB


def table_row(row: dict[str, Any]) -> str:
  cells = (row["program"], row["topology"], row["chips"], row["mesh"], row["batch"],
           _f(_gib(row["argument_bytes"]), ".4f"), _f(_gib(row["temp_bytes"]), ".4f"),
           _f(_gib(row["total_bytes"]), ".4f"), _f(_gib(row["hbm_bytes"]), ".0f"),
           _f(None if row["flops"] is None else row["flops"] / 1e9, ".4g"), _f(row["est_seconds"], ".3g"),
           _f(row["est_mfu"], ".1%"), _f(row["compile_s"], ".1f"), "FITS" if row["fits"] else "DOES NOT FIT")
  return "| " + " | ".join(str(c) for c in cells) + " |"


def table(rows: Sequence[dict[str, Any]]) -> str:
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  return "\n".join(lines + [table_row(r) for r in rows])


def json_line(rows: Sequence[dict[str, Any]], **extra) -> str:
  clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v
  return json.dumps({"preflight": [{k: clean(v) for k, v in r.items()} for r in rows], **extra}, sort_keys=True)


def report(rows: Sequence[dict[str, Any]], **extra) -> int:
  """Prints the table and the JSON line; 0 when everything fits, else 1."""
  print(table(rows))
  for r in rows:
    if r.get("compiler_error"):
      print(f"{r['program']}: the TPU compiler refused it: {r['compiler_error']}")
  print(json_line(rows, **extra))
  return 0 if all(r["fits"] for r in rows) else 1


# ---- training ---------------------------------------------------------------------------------------------------
CLIP_CONTEXT = 77          # CLIP's text context (the decoder's text_enc/text_mask length in its data)


def abstract_batch(cfg, text_length: int = CLIP_CONTEXT) -> dict[str, tuple[tuple[int, ...], str]]:
  """{key: (global shape, dtype)} of one training batch of the stage, as its data iterator yields it."""
  b = int(cfg.batch_size)
  stage = cfg.stage
  if stage == "decoder":
    s, e = int(cfg.model.image_size), int(cfg.model.clip_embedding_dim)
    if cfg.model.text_encoder == "glide_clip":   # stages.decoder.GLIDE_CLIP_KEYS: caption tokens, not CLIP states
      text = {"tokens": ((b, text_length), "int32")}
    else:
      text = {"text_emb": ((b, e), "float32"), "text_enc": ((b, text_length, e), "float32")}
    return {"image": ((b, s, s, 3), "float32"), "image_emb": ((b, e), "float32"), **text,
            "text_mask": ((b, text_length), "bool")}
  if stage == "upsampler":
    s = int(cfg.model.image_size)
    return {"image": ((b, s, s, 3), "float32")}
  if stage == "prior":
    e, l = int(cfg.model.embedding_dim), int(cfg.model.num_embeddings)
    return {"image_emb": ((b, e), "float32"), "text_emb": ((b, e), "float32"),
            "text_enc": ((b, l, e), "float32"), "text_mask": ((b, l), "bool")}
  if stage == "ar_prior":               # stages.ar_prior.KEYS: caption tokens with their mask, both embeddings
    e, l = int(cfg.model.embedding_dim), int(cfg.model.text_len)
    return {"tokens": ((b, l), "int32"), "text_mask": ((b, l), "bool"), "text_emb": ((b, e), "float32"),
            "image_emb": ((b, e), "float32")}
  if stage == "clip":                   # stages.clip.clip_batch: token ids and CLIP-normalised pixels
    s, t = int(cfg.model.vision.image_size), int(cfg.model.text.context_length)
    return {"ids": ((b, t), "int32"), "pixels": ((b, s, s, 3), "float32")}
  raise PreflightError(f"compile-only preflight supports the decoder, upsampler, prior, ar_prior and clip stages; not "
                       f"{stage!r} yet")


class _Zeros:
  """An endless iterator of zero batches (the prior's statistics pass at task build; never trained on)."""

  def __init__(self, spec):
    import numpy as np

    self._batch = {k: np.zeros(shape, dtype) for k, (shape, dtype) in spec.items()}

  def __iter__(self):
    return self

  def __next__(self):
    return self._batch


class _Gaussian(_Zeros):
  """An endless iterator of standard-normal float batches (integer and bool keys zero): the AR prior's PCA and
  quantiser fit at task build (only their shapes reach the compiled program; zeros would leave the PCA degenerate)."""

  def __init__(self, spec):
    import numpy as np

    rng = np.random.default_rng(0)
    self._batch = {k: rng.standard_normal(shape).astype(dtype) if dtype == "float32" else np.zeros(shape, dtype)
                   for k, (shape, dtype) in spec.items()}


def check_train_inputs(cfg, chip_count: int, topology: str) -> tuple[int, ...]:
  """The mesh shape of `cfg.mesh` on `chip_count` chips, and the global batch divisible by the data axes."""
  from unclip_jax.parallel import mesh as mesh_lib

  try:
    shape = mesh_lib.mesh_shape(dict(cfg.mesh), chip_count)
  except ValueError as e:
    raise PreflightError(f"mesh {dict(cfg.mesh)} does not fit {topology} ({chip_count} chips): {e}") from None
  sizes = dict(zip(mesh_lib.MESH_AXES, shape))
  data = sizes["data"] * sizes["fsdp"]
  if int(cfg.batch_size) % data:
    raise PreflightError(f"global batch {cfg.batch_size} is not divisible by the data axes data×fsdp = "
                         f"{sizes['data']}×{sizes['fsdp']} = {data} of mesh {sizes} on {topology}")
  return shape


def train_preflight(cfg, topology: str, num_slices: int = 1, *, text_length: int = CLIP_CONTEXT) -> dict[str, Any]:
  """Builds the train state, shardings and step `train.loop.train` would and compiles them for `topology`.

  Returns the measured row (see `finish_row`). Raises PreflightError on bad input, before compiling."""
  chip, dims = parse_topology(topology)
  count = math.prod(dims) * int(num_slices)
  shape = check_train_inputs(cfg, count, topology)      # cheap checks before libtpu is even loaded
  batch_spec = abstract_batch(cfg, text_length)
  chip, devices = abstract_devices(topology, num_slices)
  if len(devices) != count:
    shape = check_train_inputs(cfg, len(devices), topology)

  import flax.linen as nn
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  from unclip_jax import stages
  from unclip_jax.ckpt.manager import abstract_with_shardings
  from unclip_jax.data.global_batch import batch_sharding
  from unclip_jax.parallel import mesh as mesh_lib, partitioning
  from unclip_jax.train import loop, optim
  from unclip_jax.train.state import TrainState
  from unclip_jax.train.step import make_train_step

  mesh = mesh_lib.make_mesh(dict(cfg.mesh), devices)
  kwargs = {}
  if cfg.stage == "prior":
    kwargs = {"stats_data": _Zeros(batch_spec)}
  elif cfg.stage == "ar_prior":         # the fit's size does not change the program: enough rows for the PCA
    cfg = cfg.copy_and_resolve_references()
    cfg.stats_examples = min(int(cfg.stats_examples), max(2 * int(cfg.model.num_components), 1024))
    kwargs = {"stats_data": _Gaussian(batch_spec)}
  task = stages.make_task(cfg, data=iter(()), mesh=mesh, **kwargs)
  rules = tuple(tuple(r) for r in cfg.axis_rules)
  tx = optim.make_optimizer(cfg)
  init_rng, step_rng = jax.eval_shape(lambda: tuple(jax.random.split(jax.random.key(cfg.seed))))
  t0, c0 = time.perf_counter(), time.process_time()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract_params = jax.eval_shape(task.init_params, init_rng)
    param_sh = partitioning.param_shardings(abstract_params, mesh, rules, min_bytes=cfg.fsdp_min_bytes)
    abstract_state = jax.eval_shape(lambda rng: TrainState.create(nn.unbox(task.init_params(rng)), tx), init_rng)
    state_sh = loop.state_shardings(abstract_state, param_sh, mesh)
    state = abstract_with_shardings(abstract_state, state_sh)
    batch = {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sharding(mesh, len(s))) for k, (s, d) in batch_spec.items()}
    batch_sh = {k: v.sharding for k, v in batch.items()}
    replicated = NamedSharding(mesh, P())
    rng = jax.ShapeDtypeStruct(step_rng.shape, step_rng.dtype, sharding=replicated)
    step_fn = make_train_step(task.loss_fn, tx, ema_decay=cfg.optim.ema_decay, grad_accum=int(cfg.optim.grad_accum),
                              lr_schedule=optim.learning_rate_schedule(cfg), ema_warmup=bool(cfg.optim.ema_warmup))
    jitted = jax.jit(step_fn, in_shardings=(state_sh, batch_sh, replicated), out_shardings=(state_sh, None),
                     donate_argnums=0)
    compiled, row = compile_or_oom(jitted.lower(state, batch, rng), compile_s0=t0)
  if compiled is not None:
    row = measure(compiled, compile_s=time.perf_counter() - t0)
  row["compile_cpu_s"] = time.process_time() - c0        # all threads: less sensitive to a busy host than wall s
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params))
  row.update(program=f"train {cfg.stage}:{cfg.get('variant', '?')}", topology=topology, num_slices=int(num_slices),
             mesh="x".join(str(s) for s in shape), batch=int(cfg.batch_size), params=int(n_params))
  return finish_row(row, chip, len(devices))


# ---- sampling ---------------------------------------------------------------------------------------------------
def read_bundle_configs(path) -> dict[str, Any]:
  """{component: completed stage config} of a bundle folder, without reading its params."""
  import pathlib

  from unclip_jax import bundle, config_lib

  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"model bundle not found: {path}")
  out = {}
  for name in bundle.list_components(path):
    d = bundle.read_json(path / name / bundle.CONFIG_NAME, "component config")
    out[name] = config_lib.complete(d)
  return out


# The Karlo chain as `convert karlo` builds it (text tower only: Karlo ships CLIP's text encoder, no vision tower).
CHAIN_PRESETS = {"karlo": {"clip": "clip:vit_l14", "prior": "prior:karlo", "decoder": "decoder:karlo",
                           "super_res_first": "upsampler:karlo_64_256", "super_res_last": "upsampler:karlo_64_256"}}


def chain_configs(spec: str) -> dict[str, Any]:
  """{component: stage config} from a preset name ("karlo") or "component=config,..." (e.g.
  "clip=clip:vit_l14,prior=prior:karlo,decoder=decoder:paper"): a chain to compile without weights on disk."""
  from unclip_jax import bundle, config_lib

  if spec in CHAIN_PRESETS:
    pairs = dict(CHAIN_PRESETS[spec])
  else:
    pairs = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
      name, eq, cfg = item.partition("=")
      if not eq or name not in bundle.COMPONENTS:
        raise PreflightError(f"--configs: {item!r} is not component=config with a component of "
                             f"{list(bundle.COMPONENTS)} (or use a preset: {list(CHAIN_PRESETS)})")
      pairs[name] = cfg
  missing = [n for n in ("clip", "prior", "decoder") if n not in pairs]
  if missing:
    raise PreflightError(f"--configs {spec!r} lacks {missing} (a chain needs clip, prior and decoder)")
  out = {}
  for name, spec_ in pairs.items():
    try:
      cfg = config_lib.load_config(spec_)
    except (FileNotFoundError, ValueError) as e:
      raise PreflightError(f"--configs {name}={spec_}: {e}") from None
    if cfg.stage != bundle.COMPONENT_STAGES[name]:
      raise PreflightError(f"--configs {name}={spec_} is a {cfg.stage!r} config; {name} takes "
                           f"{bundle.COMPONENT_STAGES[name]!r}")
    if name == "clip" and spec in CHAIN_PRESETS:
      cfg = cfg.copy_and_resolve_references()
      cfg.model.vision, cfg.model.logit_scale = None, False
    out[name] = cfg
  return out


def _bytes(tree) -> int:
  import jax
  import numpy as np

  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def sample_preflight(bundle_path, topology: str, batch: int, *, num_slices: int = 1, dtype: str = "bfloat16",
                     sampling: dict | None = None, configs: dict | None = None,
                     param_dtype: str = "float32") -> list[dict[str, Any]]:
  """Compiles each stage's jitted sampler of the bundle's pipeline (or of `configs`, {component: stage config},
  when given; no weights needed) for `topology` (weights replicated over a ("data",) mesh of all its chips, batch
  rows sharded) from abstract params and inputs.

  FLOPs and estimated seconds of a sampling stage are one model forward's (its scan body) × forwards per call:
  XLA counts a loop body once and its cost model gives no time for a while loop. The last row is the chain: all
  weights resident plus the largest stage's other memory; FLOPs, seconds and compile time summed."""
  if int(batch) < 1:
    raise PreflightError(f"--batch must be >= 1, got {batch}")
  chip, dims = parse_topology(topology)
  count = math.prod(dims) * int(num_slices)
  if int(batch) % count:
    raise PreflightError(f"--batch {batch} is not divisible by the {count} chips of {topology}"
                         f"{f' x {num_slices} slices' if num_slices > 1 else ''} (rows are sharded over all chips)")
  cfgs = configs if configs is not None else read_bundle_configs(bundle_path)
  chip, devices = abstract_devices(topology, num_slices)

  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from unclip_jax import bundle
  from unclip_jax.inference.pipeline import TextEncoding, UnCLIP, num_steps
  from unclip_jax.models.clip import CLIP
  from unclip_jax.stages import decoder as decoder_lib

  # weights as the bundle loader holds them (float32), or stored in bfloat16 (an `UnCLIP` given bf16 params)
  cast = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(param_dtype)), tree)
  components = {name: (cfg, cast(bundle.abstract_params(cfg))) for name, cfg in cfgs.items()}
  pipe = UnCLIP(components, sampling=sampling, dtype=dtype, devices=devices)
  mesh = pipe.mesh
  n = mesh.size
  rows_sh, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

  def shard(tree, params: bool = False):
    def leaf(x):
      if x is None:
        return None
      s = whole if params or not x.shape or x.shape[0] % n else rows_sh
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    return jax.tree.map(leaf, tree)

  sds = jax.ShapeDtypeStruct
  b, l = int(batch), pipe.prior.num_embeddings
  key = jax.eval_shape(lambda: jax.random.key(0))
  clip_p = shard(pipe.clip_params, True)
  ids = shard(sds((b, l), jnp.int32))
  emb, enc = jax.eval_shape(lambda p, i: pipe.clip.apply({"params": p}, i, method=CLIP.encode_text), clip_p, ids)
  text = TextEncoding(*shard((emb, enc, sds((b, l), jnp.bool_))), ids)
  key = shard(key)
  null = lambda cfg: text.as_prior_cond() if cfg.get("null_text", "zeros") == "empty_prompt" else None
  s, e = pipe.decoder_size, emb.shape[-1]
  image_emb = shard(sds((b, e), jnp.float32))
  prior_p, dec_p = shard(pipe.prior_params, True), shard(pipe.decoder_params, True)

  # (name, jitted stage, its args, params, forward fn + args or None, forwards per call)
  pc, dc = pipe.prior_cfg, pipe.decoder_cfg
  prior_rows = b * int(pc.num_candidates) * (2 if pc.sampling.guidance_scale != 1.0 else 1)
  branches = decoder_lib.settings_for(dc).branches
  dec_rows = branches * b
  cond = jax.eval_shape(lambda p, c: pipe.decoder_kwargs(p, c, guidance=branches), dec_p,
                        pipe.decoder_cond(image_emb, text))
  f32 = jnp.float32
  plan = [
      ("text", pipe._encode_text, (clip_p, ids), clip_p, None, 1),
      ("prior", pipe._prior, (prior_p, text.as_prior_cond(), key, null(pc), None), prior_p,
       (lambda p, x, t, te, en, m: pipe.prior.apply({"params": p}, x, t, te, en, m),
        (prior_p, *shard((sds((prior_rows, e), f32), sds((prior_rows,), jnp.int32), sds((prior_rows, e), f32),
                          sds((prior_rows, l, e), f32), sds((prior_rows, l), jnp.bool_))))), num_steps(pc)),
      ("decoder", pipe._decoder, (dec_p, pipe.decoder_cond(image_emb, text), shard(sds((b, s, s, 3), f32)), key,
                                  null(dc), None, None), dec_p,
       (lambda p, x, t, kw: pipe.unet.apply({"params": p}, x, t, **kw),
        (dec_p["unet"], *shard((sds((dec_rows, s, s, 3), f32), sds((dec_rows,), jnp.int32), cond)))),
       num_steps(dc)),
  ]
  if pipe.sr_cfg is not None:
    size = pipe.image_size
    sr_first = shard(pipe.sr_first, True)
    sr_last = shard(pipe.sr_last, True)
    plan.append(("super_res", pipe._super_res, (sr_first, sr_last, shard(sds((b, s, s, 3), f32)),
                                                 shard(sds((b, size, size, 3), f32)), key), (sr_first, sr_last),
                 (lambda p, x, t: pipe.sr_unet.apply({"params": p}, x, t),
                  (sr_first, *shard((sds((b, size, size, pipe.sr_unet.in_channels), f32), sds((b,), jnp.int32))))),
                 num_steps(pipe.sr_cfg)))

  rows = []
  for name, fn, args, params, forward, forwards in plan:
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
      compiled, row = compile_or_oom(fn.lower(*args), compile_s0=t0)
    if compiled is not None:
      row = measure(compiled, compile_s=time.perf_counter() - t0)
    if compiled is not None and forward is not None:     # the loop body: one model forward, costed on its own
      t0 = time.perf_counter()
      with jax.set_mesh(mesh):
        body = jax.jit(forward[0]).lower(*forward[1]).compile()
      one = measure(body, compile_s=time.perf_counter() - t0)
      row.update(flops_per_chip=None if one["flops_per_chip"] is None else one["flops_per_chip"] * forwards,
                 est_seconds=None if one["est_seconds"] is None else one["est_seconds"] * forwards,
                 body_compile_s=one["compile_s"])
    row.update(program=f"sample {name}", topology=topology, num_slices=int(num_slices), mesh=str(n), batch=b,
               forwards=forwards, param_bytes=_bytes(params))
    rows.append(finish_row(row, chip, len(devices)))
  chain = {"program": "sample chain", "topology": topology, "num_slices": int(num_slices), "mesh": str(n),
           "batch": b, "param_bytes": sum(r["param_bytes"] for r in rows), "alias_bytes": 0,
           "compile_s": sum(r["compile_s"] + r.get("body_compile_s", 0.0) for r in rows)}
  if any(r.get("compiler_error") for r in rows):
    chain.update(argument_bytes=None, output_bytes=None, temp_bytes=None, total_bytes=None, flops_per_chip=None,
                 est_seconds=None, compiler_error="a stage does not fit (above)")
  else:
    p_total = chain["param_bytes"]
    chain.update(argument_bytes=p_total + max(r["argument_bytes"] - r["param_bytes"] for r in rows),
                 output_bytes=max(r["output_bytes"] for r in rows), temp_bytes=max(r["temp_bytes"] for r in rows),
                 total_bytes=p_total + max(r["total_bytes"] - r["param_bytes"] for r in rows),
                 flops_per_chip=_sum(r["flops_per_chip"] for r in rows),
                 est_seconds=_sum(r["est_seconds"] for r in rows))
  rows.append(finish_row(chain, chip, len(devices)))
  return rows


def _sum(values) -> float | None:
  values = list(values)
  return None if any(v is None for v in values) else float(sum(values))


def sample_main(argv: Sequence[str]) -> int:
  """`python -m unclip_jax.sample --compile-only --topology T --batch N [--bundle B] [--num-slices S] ...`"""
  import argparse
  import pathlib
  import sys

  from unclip_jax import sample

  p = argparse.ArgumentParser(prog="python -m unclip_jax.sample --compile-only",
                              description="compile the sampling chain for a TPU topology (nothing is run)")
  p.add_argument("--compile-only", action="store_true", required=True)
  p.add_argument("--topology", required=True, help="e.g. v5e:2x2, v5p:2x2x1, v6e:4x4")
  p.add_argument("--num-slices", type=int, default=1)
  p.add_argument("--batch", type=int, default=8, help="images per call of each stage (rows over all chips)")
  p.add_argument("--bundle", default=None, help="model bundle folder (default: the embedded model)")
  p.add_argument("--configs", default=None,
                 help=f"compile stage configs instead of a bundle (no weights needed): a preset ({', '.join(CHAIN_PRESETS)}) "
                      "or component=config,... e.g. clip=clip:vit_l14,prior=prior:karlo,decoder=decoder:karlo,"
                      "super_res_first=upsampler:karlo_64_256")
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  p.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"),
                 help="weight storage: float32 as bundles load, or bfloat16 (half the resident weights)")
  sample._stage_flags(p)
  args = p.parse_args([a for a in argv if a != "generate"])
  try:
    if args.configs and args.bundle:
      raise PreflightError("--configs and --bundle are two sources of the chain: give one")
    configs = chain_configs(args.configs) if args.configs else None
    bundle_path = pathlib.Path(args.bundle) if args.bundle else sample.DEFAULT_BUNDLE
    rows = sample_preflight(bundle_path, args.topology, args.batch, num_slices=args.num_slices, dtype=args.dtype,
                            sampling=sample.sampling_overrides(args), configs=configs, param_dtype=args.param_dtype)
  except (PreflightError, FileNotFoundError, ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  source = {"configs": args.configs} if configs is not None else {"bundle": str(bundle_path)}
  return report(rows, **source)


def train_main(cfg, topology: str | None, num_slices: int = 1) -> int:
  """`python -m unclip_jax.train --config C --workdir D --compile_only --topology T [--num_slices N]`."""
  import sys

  if not topology:
    print("error: --compile_only needs --topology (e.g. v5p:2x2x1, v5e:2x2, v6e:4x4)", file=sys.stderr)
    return 2
  try:
    row = train_preflight(cfg, topology, num_slices)
  except PreflightError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return report([row])
