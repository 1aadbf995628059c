"""bench/tpu_conv_compile.py's static estimate from TPU final-bundle dumps: loop trip counts weight the bundles
inside each loop (nested loops multiply), and the largest loop body is reported. Synthetic dumps in the format
libtpu writes (`--xla_jf_dump_llo_text`); no libtpu needed."""
import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
  sys.path.insert(0, str(ROOT / "bench"))
  try:
    spec = importlib.util.spec_from_file_location("tpu_conv_compile", ROOT / "bench" / "tpu_conv_compile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
  finally:
    sys.path.remove(str(ROOT / "bench"))


HEADER = """= control target key start
LH: loop header
LB: loop body
LE: loop exit
= control target key end
"""


def _bundle(addr, text, lb=False):
  return f"  {addr:#x} {'LB:' if lb else '  '} > {{ {text} }}"


def test_single_loop(bench):
  lines = [HEADER, "     0   :  { %s1 = smov 0 }", _bundle(1, "%v1 = vld [vmem:[%s0]]", lb=True),
           _bundle(2, "%v2 = vmatmul.f32.gmra.mxu0 %v1"),
           _bundle(3, "%p5 = scmp.ge.s32.totalorder %s8_s11, 5 /* loop exit test */"),
           _bundle(4, "%7 = sbr.rel (!%p5) target = $region3"), _bundle(5, "%s9 = smov 1")]
  # 1 bundle before, 4 in the loop (header bundle to the back branch) x 5 trips, 1 after
  assert bench.static_cycles("\n".join(lines)) == (1 + 4 * 5 + 1, 4)


def test_nested_loops_multiply(bench):
  lines = [HEADER, _bundle(0, "%s1 = smov 0", lb=True),                       # outer body starts
           _bundle(1, "%v1 = vld [vmem:[%s0]]", lb=True),                     # inner body starts
           _bundle(2, "%p1 = scmp.ge.s32.totalorder %s2_s3, 3 /* loop exit test */"),
           _bundle(3, "%4 = sbr.rel (!%p1) target = $region2"),
           _bundle(4, "%p2 = scmp.ge.s32.totalorder %s5_s6, 2 /* loop exit test */"),
           _bundle(5, "%6 = sbr.rel (!%p2) target = $region1")]
  cycles, largest = bench.static_cycles("\n".join(lines))
  # inner 3 bundles x 3 x 2, outer-only bundles (0, 4, 5) x 2
  assert cycles == 3 * 3 * 2 + 3 * 2
  assert largest == 6


def test_straight_line(bench):
  lines = [HEADER] + [_bundle(i, f"%v{i} = vadd.f32 %v0, %v0") for i in range(7)]
  assert bench.static_cycles("\n".join(lines)) == (7, 0)


def test_bad_cli_input(bench):
  with pytest.raises(SystemExit, match="CHANNELSxSIZE"):
    bench.parse_shapes("320x64,640")
  with pytest.raises(SystemExit, match="NAME=FLAGS"):
    bench.parse_flag_sets("default")
