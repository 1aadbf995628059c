"""Smoke runs of bench/sample_throughput.py and bench/train_step.py at the tiny size, as subprocesses.

Each must exit 0 and print its markdown table with the expected columns and one row per requested run (the
diffusers peer included). The numbers themselves are never asserted: they are measurements, not results.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(script, args, tmp_path):
  # One CPU device (conftest forces 8 in this process); -O0 backend codegen: compiles dominate a tiny run.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
  out = tmp_path / f"{pathlib.Path(script).stem}.json"
  proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, "--json", str(out)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
  print(proc.stdout)
  return proc.stdout.splitlines(), json.loads(out.read_text())


def _table(lines, first_column):
  """(header cells, data rows as cell lists) of the markdown table whose first header cell is `first_column`."""
  start = next(i for i, l in enumerate(lines) if l.startswith(f"| {first_column} |"))
  cells = lambda l: [c.strip() for c in l.strip().strip("|").split("|")]
  rows = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    rows.append(cells(line))
  assert lines[start + 1].startswith("|---|")
  return cells(lines[start]), rows


def test_sample_throughput_tiny(tmp_path):
  lines, payload = _run("sample_throughput.py", ["--size", "tiny", "--batch", "1", "--repeats", "1", "--warmup", "0",
                                                 "--ablations"], tmp_path)
  header, rows = _table(lines, "impl")
  for col in ("batch", "text s", "prior s", "decoder s", "super-res s", "total s/batch", "img/s", "TFLOP/img",
              "FLOP src", "MFU", "peak mem GiB", "first call s", "ours/diffusers img/s"):
    assert col in header, col
  assert sorted(r[0] for r in rows) == ["diffusers", "unclip_jax"]
  assert all(len(r) == len(header) and r[header.index("batch")] == "1" for r in rows)
  ours = next(r for r in rows if r[0] == "unclip_jax")
  assert ours[header.index("ours/diffusers img/s")].endswith("x")
  assert ours[header.index("FLOP src")] in ("xla", "jaxpr")
  stage_header, stage_rows = _table(lines, "stage")
  assert {"forwards/img", "GFLOP/forward (xla)", "GFLOP/forward (jaxpr)", "GFLOP/img", "compile s",
          "first call s"} <= set(stage_header)
  assert [r[0] for r in stage_rows] == ["text", "prior", "decoder", "super_res"]
  _, ablations = _table(lines, "decoder sampler variant")
  assert len(ablations) == 4 and "attention auto = xla" in ablations[0][0]     # CPU: "auto" is XLA
  assert {r["impl"] for r in payload["results"]} == {"diffusers", "unclip_jax"}


def test_train_step_tiny(tmp_path):
  lines, payload = _run("train_step.py", ["--size", "tiny", "--batch", "2", "--repeats", "1"], tmp_path)
  header, rows = _table(lines, "stage")
  for col in ("batch", "remat", "compile s", "step s", "examples/s", "XLA GFLOP/step", "model GFLOP/step", "MFU",
              "XLA mem GiB", "XLA temp GiB", "peak mem GiB"):
    assert col in header, col
  assert [r[0] for r in rows] == ["decoder", "prior", "super_res", "clip"]
  assert all(len(r) == len(header) and r[header.index("batch")] == "2" for r in rows)
  assert [r["stage"] for r in payload["results"]] == ["decoder", "prior", "super_res", "clip"]


def test_sample_flops_only_karlo(tmp_path):
  # Karlo sizes from abstract params: nothing allocated, nothing timed.
  lines, payload = _run("sample_throughput.py", ["--size", "karlo", "--flops-only", "--batch", "1"], tmp_path)
  header, rows = _table(lines, "stage")
  assert [r[0] for r in rows] == ["text", "prior", "decoder", "super_res"]
  assert all(len(r) == len(header) for r in rows)
  assert set(payload["stage_flops"]) == {"text", "prior", "decoder", "super_res"}


def test_compile_only_modes(tmp_path):
  # Lower + compile from abstract params and batches: nothing allocated, nothing run; step columns stay empty.
  lines, payload = _run("sample_throughput.py", ["--size", "tiny", "--compile-only", "--batch", "1,2"], tmp_path)
  header, rows = _table(lines, "stage")
  assert header == ["stage", "batch", "lower s", "compile s", "XLA mem GiB"]
  assert [(r[0], r[1]) for r in rows] == [(s, b) for b in "12" for s in ("text", "prior", "decoder", "super_res")]
  assert all(r["compile_s"] > 0 for r in payload["compile"])
  lines, payload = _run("train_step.py", ["--size", "tiny", "--stages", "prior", "--batch", "2", "--remat",
                                          "none,full", "--compile-only"], tmp_path)
  header, rows = _table(lines, "stage")
  assert [r[header.index("remat")] for r in rows] == ["none", "full"]
  assert all(r[header.index("step s")] == "-" and r[header.index("compile s")] != "-" for r in rows)
  assert all(r["step_s"] is None and r["xla_flops_per_step"] for r in payload["results"])
