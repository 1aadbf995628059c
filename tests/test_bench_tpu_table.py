"""bench/tpu_table.py's bookkeeping (no libtpu needed: the compile attempts are replaced by a stand-in): the remat /
gradient-accumulation ladder keeps the effective batch, rows run in priority order, a row stops climbing at the
first fit or at a failure that is not an out-of-memory, results append and resume, and the table renders both."""
import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def table():
  spec = importlib.util.spec_from_file_location("tpu_table", ROOT / "bench" / "tpu_table.py")
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod                       # its dataclasses look their module up
  try:
    spec.loader.exec_module(mod)
    yield mod
  finally:
    sys.modules.pop(spec.name, None)


def _stage(table, config):
  return next(s for s in table.STAGES if s.config == config)


def test_ladder_keeps_the_effective_batch(table):
  steps = list(table.ladder(_stage(table, "decoder:paper"), 64))
  assert steps[0] == ("none", 2048, 1) and steps[1] == ("full", 2048, 1)
  assert all(b * k == 2048 and b % 64 == 0 for _, b, k in steps)
  assert [k for _, _, k in steps[1:]] == [1, 2, 4, 8, 16, 32]        # 2048 / 32 = 64 rows: one per chip
  karlo = list(table.ladder(_stage(table, "decoder:karlo"), 4))
  assert karlo[0] == ("none", 32, 1) and karlo[-1] == ("full", 4, 8)


def test_sampling_row_is_one_chain_compile(table):
  stage = _stage(table, "karlo")
  assert list(table.ladder(stage, 1)) == [("-", 8, 1)]
  cmd = table.command(stage, "v5e:1x1", "-", 8, 1, "/unused")
  assert cmd[1:] == ["-m", "unclip_jax.sample", "--compile-only", "--configs", "karlo", "--topology", "v5e:1x1",
                     "--batch", "8", "--param-dtype", "float32"]
  bf16 = table.command(_stage(table, "karlo:bf16"), "v5e:1x1", "-", 8, 1, "/unused")
  assert bf16[-2:] == ["--param-dtype", "bfloat16"] and "karlo" in bf16
  assert table.shell(cmd).startswith("python -m unclip_jax.sample")
  assert table.row_name(stage, "v5e:1x1") == "sample:karlo@v5e:1x1"


def test_rows_run_targets_first_and_cover_every_stage_and_topology(table):
  rows = table.all_rows()
  names = [table.row_name(s, t) for s, t in rows]
  assert len(names) == len(set(names)) == sum(len(s.topologies) for s in table.STAGES)
  first = names[:8]
  assert set(first) == ({f"{s.config}@v5p:4x4x4" for s in table.STAGES if s.size == "paper"}
                        | {"sample:karlo@v5e:1x1", "sample:karlo:bf16@v5e:1x1"})
  assert names.index("prior:paper@v5p:4x4x4") < names.index("decoder:paper@v5p:4x4x4")   # cheap compiles first


def _fake(results):
  calls = []

  def run_attempt(cmd, timeout):
    calls.append(cmd)
    return dict(results[len(calls) - 1], wall_s=1.0)
  return run_attempt, calls


FIT = {"fits": True, "mesh": "1x64x1", "params": 3.5e9, "total_bytes": 2 ** 36, "hbm_bytes": 95 * 2 ** 30,
       "flops": 1e15, "est_seconds": 0.5, "est_mfu": 0.4, "compile_s": 900.0, "compile_cpu_s": 880.0}


def test_a_row_climbs_until_it_fits(table, monkeypatch):
  oom = dict(FIT, fits=False, compiler_error="RESOURCE_EXHAUSTED")
  run_attempt, calls = _fake([oom, oom, FIT])
  monkeypatch.setattr(table, "run_attempt", run_attempt)
  res = table.run_row(_stage(table, "decoder:paper"), "v5p:4x4x4", timeout=10)
  assert len(calls) == 3 and res["fits"] and res["row"]["grad_accum"] == 2 and res["row"]["remat"] == "full"
  assert "--config.optim.grad_accum=2" in res["row"]["command"] and "/tmp/pf" in res["row"]["command"]


def test_a_row_stops_at_a_failure_that_is_not_memory(table, monkeypatch):
  run_attempt, calls = _fake([{"error": "timed out after 10 s"}, FIT])
  monkeypatch.setattr(table, "run_attempt", run_attempt)
  res = table.run_row(_stage(table, "prior:paper"), "v5p:4x4x4", timeout=10)
  assert len(calls) == 1 and not res["fits"]
  assert "timed out" in table.markdown({res["name"]: res})


def test_results_append_resume_and_render(table, monkeypatch, tmp_path, capsys):
  out = tmp_path / "t.jsonl"
  run_attempt, calls = _fake([FIT] * 10)
  monkeypatch.setattr(table, "run_attempt", run_attempt)
  assert table.main(["--out", str(out), "--only", "^prior:paper@v5p"]) == 0
  assert len(calls) == 2 and len(out.read_text().splitlines()) == 2           # 4x4x4 and 2x2x1
  assert table.main(["--out", str(out), "--only", "^prior:paper@v5p"]) == 0   # both done: nothing recompiled
  assert len(calls) == 2
  row = json.loads(out.read_text().splitlines()[0])
  assert row["name"] == "prior:paper@v5p:4x4x4" and row["effective_batch"] == 4096
  md = capsys.readouterr().out
  assert "| prior:paper | v5p:4x4x4 | 64 | 1x64x1 | 4096 (4096 × 1) | none | 3.5 B |" in md and "FITS" in md and "| - |" in md
  assert table.main(["--out", str(out), "--only", "no-such-row"]) == 2


def test_a_row_is_recorded_from_saved_output(table, tmp_path, capsys):
  """--record: the output of a preflight run by hand (or one whose runner was stopped) becomes the row."""
  out, saved = tmp_path / "t.jsonl", tmp_path / "stdout.txt"
  row = dict(FIT, program="train decoder:paper", topology="v5p:4x4x4", chips=64, batch=2048)
  saved.write_text("| table |\n" + json.dumps({"bundle": "b", "preflight": [row]}, sort_keys=True) + "\n")
  assert table.main(["--out", str(out), "--record", "decoder:paper@v5p:4x4x4", "none", "2048", "1", str(saved)]) == 0
  (rec,) = [json.loads(l) for l in out.read_text().splitlines()]
  assert rec["name"] == "decoder:paper@v5p:4x4x4" and rec["fits"] and rec["row"]["remat"] == "none"
  assert "--config.batch_size=2048" in rec["row"]["command"] and "FITS" in capsys.readouterr().out
  assert table.main(["--out", str(out), "--record", "nope@v5p:4x4x4", "none", "1", "1", str(saved)]) == 2
