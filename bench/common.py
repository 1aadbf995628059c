"""Helpers shared by the benchmarks: device facts, timing, FLOP counts, compile-time capture, tables.

FLOPs come from XLA's `cost_analysis()` where the backend gives one ("xla"), else from counting the matmul and
convolution FLOPs of the jaxpr ("jaxpr": 2·M·N·K per dot, 2·out·K per conv; elementwise work not counted). XLA's
cost analysis counts a while/scan body once, whatever its trip count, so sampling stages are costed per model
forward and multiplied by the number of forwards; the jaxpr count multiplies scan bodies by their length itself.
"""
from __future__ import annotations

import contextlib
import json
import math
import pathlib
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:                 # `python bench/x.py` from a checkout without `pip install -e .`
  sys.path.insert(1, str(ROOT))
CONFIG_DIR = ROOT / "configs"
COMPILE_EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration")


# ---- device ---------------------------------------------------------------------------------------------------
def device_info(device: jax.Device | None = None) -> dict[str, Any]:
  """platform, device kind, device count and dense bf16 peak FLOP/s (None when the device is not in the table)."""
  from unclip_jax.train.loop import peak_flops

  device = device or jax.devices()[0]
  return {"platform": device.platform, "kind": device.device_kind, "devices": jax.device_count(),
          "peak_flops": peak_flops(device), "jax": jax.__version__}


def default_dtype(platform: str) -> str:
  """bf16 compute on accelerators, fp32 on CPU (XLA:CPU has no fast bf16 matmuls)."""
  return "float32" if platform == "cpu" else "bfloat16"


def device_peak_bytes(device: jax.Device | None = None) -> int | None:
  """Peak bytes in use on the device since the process started (None where the backend keeps no stats, e.g. CPU)."""
  stats = (device or jax.devices()[0]).memory_stats()
  if not stats:
    return None
  value = stats.get("peak_bytes_in_use")
  return int(value) if value is not None else None


def compiled_memory(compiled) -> dict[str, int] | None:
  """XLA's memory analysis of one compiled program: {"arguments", "outputs", "temporaries", "aliased"} bytes
  (None where the backend has none)."""
  try:
    m = compiled.memory_analysis()
  except Exception:                                    # not implemented on every backend
    return None
  if m is None:
    return None
  return {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
          "temporaries": int(m.temp_size_in_bytes), "aliased": int(m.alias_size_in_bytes)}


def total_bytes(memory: dict[str, int] | None) -> int | None:
  """A `compiled_memory` dict -> arguments + outputs + temporaries - aliased (donated) bytes (None stays None)."""
  return None if memory is None else memory["arguments"] + memory["outputs"] + memory["temporaries"] - memory["aliased"]


def compiled_memory_bytes(compiled) -> int | None:
  """XLA's estimate for one compiled program: arguments + outputs + temporaries - aliased (donated) bytes."""
  return total_bytes(compiled_memory(compiled))


# ---- timing ---------------------------------------------------------------------------------------------------
def block(tree):
  """Waits for every array in `tree` (async dispatch would otherwise stop the clock early)."""
  return jax.block_until_ready(tree)


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
  """Median wall seconds of `fn()` (which must block on its own result) over `repeats` runs after `warmup`."""
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}")
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


class CompileTimer:
  """Sums the seconds jax spends lowering to MLIR and in the backend compiler while the context is open.

  Uses jax.monitoring's duration events, so it sees exactly what a first call compiles (nothing is compiled
  twice). Compilation-cache hits are not compiles and add nothing.
  """

  def __init__(self):
    self.seconds = 0.0
    self.programs = 0

  def _listen(self, event: str, duration: float, **_):
    if event in COMPILE_EVENTS:
      self.seconds += float(duration)
      self.programs += event == COMPILE_EVENTS[0]

  def __enter__(self) -> "CompileTimer":
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)


# ---- parameters -----------------------------------------------------------------------------------------------
def random_init(init: Callable[[jax.Array], Any], rng: jax.Array, *, seed: int = 0, scale: float = 0.02):
  """Parameters for a benchmark: `jit(init)(rng)` on accelerators; on CPU N(0, scale²) host arrays of the shapes
  `init` gives (no compile at all: compiling, or running op by op, a UNet's init costs tens of seconds on a small
  CPU, and the values do not change what a step costs)."""
  if jax.default_backend() != "cpu":
    return jax.jit(init)(rng)
  shapes = jax.eval_shape(init, rng)
  gen = np.random.default_rng(seed)

  def fill(s):
    if jnp.issubdtype(s.dtype, jnp.floating):
      return jnp.asarray((scale * gen.standard_normal(s.shape)).astype(s.dtype))
    return jnp.zeros(s.shape, s.dtype)
  return jax.tree.map(fill, shapes)


# ---- FLOPs ----------------------------------------------------------------------------------------------------
def abstract(tree):
  """Arrays (or ShapeDtypeStructs) -> ShapeDtypeStructs, for lowering and tracing without data."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _cost_flops(cost) -> float | None:
  if isinstance(cost, (list, tuple)):                  # older jax: one dict per program
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  flops = float(cost["flops"])
  return flops if flops > 0 and math.isfinite(flops) else None


def xla_flops(fn: Callable, *args) -> float | None:
  """XLA's FLOP count of `jit(fn)` lowered for `args` (no compile needed); None where the backend has none."""
  try:
    return _cost_flops(jax.jit(fn).lower(*args).cost_analysis())
  except Exception:
    return None


def compiled_flops(compiled) -> float | None:
  try:
    return _cost_flops(compiled.cost_analysis())
  except Exception:
    return None


def _prod(xs: Iterable[int]) -> float:
  return float(np.prod([int(x) for x in xs])) if xs else 1.0


def _eqn_flops(eqn) -> float:
  name = eqn.primitive.name
  if name == "dot_general":
    (contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2.0 * _prod(eqn.outvars[0].aval.shape) * _prod([lhs[d] for d in contract])
  if name == "conv_general_dilated":
    rhs = eqn.invars[1].aval.shape
    spec = eqn.params["dimension_numbers"].rhs_spec        # (out feature, in feature, *spatial)
    k = rhs[spec[1]] * _prod([rhs[d] for d in spec[2:]])
    return 2.0 * _prod(eqn.outvars[0].aval.shape) * k
  return 0.0


def _sub_jaxprs(params) -> list:
  out = []
  for value in params.values():
    for v in (value if isinstance(value, (list, tuple)) else (value,)):
      if hasattr(v, "eqns"):
        out.append(v)
      elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
        out.append(v.jaxpr)
  return out


def count_jaxpr_flops(jaxpr) -> float:
  """Matmul + conv FLOPs of a jaxpr: scan bodies × length, the largest cond branch, while bodies once."""
  total = 0.0
  for eqn in jaxpr.eqns:
    total += _eqn_flops(eqn)
    subs = _sub_jaxprs(eqn.params)
    if not subs:
      continue
    name = eqn.primitive.name
    if name == "cond":
      total += max(count_jaxpr_flops(j) for j in subs)
    elif name == "scan":
      total += int(eqn.params["length"]) * sum(count_jaxpr_flops(j) for j in subs)
    elif name == "while":
      total += count_jaxpr_flops(eqn.params["body_jaxpr"].jaxpr)
    else:
      total += sum(count_jaxpr_flops(j) for j in subs)
  return total


def jaxpr_flops(fn: Callable, *args) -> float:
  """Matmul + conv FLOPs of `fn(*args)` from its jaxpr (args may be ShapeDtypeStructs)."""
  return count_jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def flops(fn: Callable, *args, source: str = "auto") -> tuple[float | None, str]:
  """(FLOPs, "xla" | "jaxpr") of one call of `fn`: XLA's count unless unavailable or source="jaxpr"."""
  if source not in ("auto", "xla", "jaxpr"):
    raise ValueError(f"unknown FLOP source {source!r}; choose auto, xla or jaxpr")
  if source != "jaxpr":
    value = xla_flops(fn, *args)
    if value is not None or source == "xla":
      return value, "xla"
  return jaxpr_flops(fn, *args), "jaxpr"


def mfu(flops_per_s: float | None, peak: float | None) -> float | None:
  if not flops_per_s or not peak:
    return None
  return flops_per_s / peak


# ---- output ---------------------------------------------------------------------------------------------------
def fmt(value, spec: str = ".3f", scale: float = 1.0) -> str:
  """A table cell: '-' for None / NaN, else `value·scale` formatted with `spec`."""
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "-"
  if isinstance(value, str):
    return value
  return format(value * scale, spec)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  for row in rows:
    if len(row) != len(headers):
      raise ValueError(f"table row has {len(row)} cells for {len(headers)} columns: {row}")
    lines.append("| " + " | ".join(str(c) for c in row) + " |")
  return "\n".join(lines)


def parse_ints(text: str, what: str) -> list[int]:
  """'1,8,32' -> [1, 8, 32] (each >= 1); a ValueError names `what`."""
  try:
    values = [int(v) for v in str(text).split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
  if not values or min(values) < 1:
    raise ValueError(f"{what} must be integers >= 1, got {text!r}")
  return values


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating, float)):
    return float(x) if math.isfinite(float(x)) else None
  if isinstance(x, (jnp.dtype, np.dtype)):
    return str(x)
  return x


def write_json(path, payload: dict) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(_jsonable(payload), f, indent=2, sort_keys=True)
    f.write("\n")


@contextlib.contextmanager
def timed(label: str, log: Callable[[str], None] | None = None):
  """Logs how long a setup step took (to stderr by default)."""
  t0 = time.perf_counter()
  yield
  (log or (lambda s: print(s, file=sys.stderr, flush=True)))(f"[bench] {label}: {time.perf_counter() - t0:.1f}s")
