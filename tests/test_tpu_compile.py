"""TPU preflight (unclip_jax.preflight): the peak-FLOP table, bad-input errors before any compile, the FITS
verdict, and, when libtpu is installed, the train step and the sampling chain compiled for an abstract v5e:2x2.

The compiles run in subprocesses (the CLIs themselves): libtpu stays out of the pytest workers, and
ALLOW_MULTIPLE_LIBTPU_LOAD lets two xdist workers compile at once. Micro UNets (one level, 8 channels) keep each
TPU compile to seconds; the tiny decoder's train step already takes minutes on 2 CPU cores.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from unclip_jax import bundle, config_lib, preflight
from unclip_jax.train import loop

ROOT = pathlib.Path(__file__).resolve().parent.parent
HAS_LIBTPU = preflight.libtpu_available()
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install 'unclip_jax[tpu]'); "
                                                         "abstract TPU compiles need it")
MICRO_UNET = ["model.block_out_channels=(8,)", "model.attention_levels=(False,)", "model.layers_per_block=1",
              "model.norm_num_groups=4"]
MICRO_FLAGS = ["--config.model.block_out_channels=(8,)", "--config.model.attention_levels=(False,)",
               "--config.model.layers_per_block=1", "--config.model.norm_num_groups=4", "--config.model.image_size=8",
               "--config.batch_size=4"]


# ---- no libtpu needed ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,want", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v6 lite", 918e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-40GB", 312e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("cpu", None), ("TPU v7", None), ("", None)])
def test_peak_flops_is_exact_on_device_kind(kind, want):
  assert loop.peak_flops(kind) == want


def test_peak_flops_of_a_device_and_the_chip_table_agree():
  assert loop.peak_flops(jax.devices()[0]) is None                 # CPU: no MFU
  for chip in preflight.CHIPS.values():
    assert loop.peak_flops(chip.device_kind) == chip.peak_flops


@pytest.mark.parametrize("name,message", [
    ("v9:2x2", "unknown TPU topology"), ("v5e", "unknown TPU topology"), ("v5e:2x2x1", "takes 2 dimensions"),
    ("v5p:2x2", "takes 3 dimensions"), ("v5e:0x2", "takes 2 dimensions")])
def test_bad_topology_names(name, message):
  with pytest.raises(preflight.PreflightError, match=message):
    preflight.parse_topology(name)


def test_collectives_of_hlo_text():
  """Counts and result bytes per kind: a plain op, a combined (tuple) all-reduce, async -start forms (their
  (operands, results, context) tuples count the results), and the -done halves not counted again."""
  hlo = "\n".join([
      "ENTRY %main {",
      "  %all-gather.1 = bf16[4,12,48]{2,1,0:T(8,128)(2,1)} all-gather(%f.6), channel_id=374, dimensions={0}",
      "  %all-reduce.2 = (f32[32]{0:T(128)}, bf16[3,3,16,16]{3,2,1,0}) all-reduce(%a, %b), to_apply=%add",
      "  %reduce-scatter.3 = f32[8,320]{1,0} reduce-scatter(%g), dimensions={0}",
      "  %collective-permute-start.4 = (bf16[8,16]{1,0}, bf16[8,16]{1,0}, u32[]{:S(2)}, u32[]{:S(2)}) "
      "collective-permute-start(%x), channel_id=17",
      "  %collective-permute-done.4 = bf16[8,16]{1,0} collective-permute-done(%collective-permute-start.4)",
      "  %all-gather-start.5 = ((f32[2,64]{1,0}, f32[2]{0}), (f32[8,64]{1,0}, f32[8]{0})) all-gather-start(%p, %q)",
      "  %all-gather-done.5 = (f32[8,64]{1,0}, f32[8]{0}) all-gather-done(%all-gather-start.5)",
      "  %fusion.7 = f32[8]{0} fusion(%all-reduce.2), kind=kLoop",
      "}"])
  got = preflight.collectives(hlo)
  assert got["all-gather"] == {"count": 2, "bytes": 4 * 12 * 48 * 2 + (8 * 64 + 8) * 4}
  assert got["all-reduce"] == {"count": 1, "bytes": 32 * 4 + 3 * 3 * 16 * 16 * 2}
  assert got["reduce-scatter"] == {"count": 1, "bytes": 8 * 320 * 4}
  assert got["collective-permute"] == {"count": 1, "bytes": 8 * 16 * 2}
  assert got["all-to-all"] == {"count": 0, "bytes": 0}
  assert preflight.collectives(None) is None


def test_topology_table():
  chip, dims = preflight.parse_topology("v5p:4x4x4")
  assert (chip.device_kind, chip.hbm_bytes, dims) == ("TPU v5", 95 * preflight.GiB, (4, 4, 4))
  assert preflight.parse_topology("v5e:16x16")[0].hbm_bytes == 16 * preflight.GiB


@pytest.mark.parametrize("overrides,message", [
    (["mesh.data=3"], "does not fit v5e:2x2"),
    (["batch_size=6"], "not divisible by the data axes"),
    (["mesh.data=2", "mesh.fsdp=2", "batch_size=2"], "not divisible by the data axes")])
def test_bad_mesh_or_batch_fails_before_compiling(overrides, message):
  cfg = config_lib.load_config("configs/decoder.py:tiny", overrides)
  with pytest.raises(preflight.PreflightError, match=message):
    preflight.train_preflight(cfg, "v5e:2x2")


def test_abstract_batches_have_the_keys_the_stages_read():
  from unclip_jax.stages.common import EMBEDDING_KEYS

  dec = config_lib.load_config("configs/decoder.py:tiny", [])
  spec = preflight.abstract_batch(dec, text_length=16)
  assert set(spec) == {"image", *EMBEDDING_KEYS} and spec["image"][0] == (8, dec.model.image_size, dec.model.image_size, 3)
  assert spec["text_enc"][0] == (8, 16, dec.model.clip_embedding_dim) and spec["text_mask"][1] == "bool"
  prior = config_lib.load_config("configs/prior.py:tiny", [])
  assert set(preflight.abstract_batch(prior)) == set(EMBEDDING_KEYS)
  assert set(preflight.abstract_batch(config_lib.load_config("configs/upsampler.py:tiny", []))) == {"image"}
  clip = config_lib.load_config("configs/clip.py:tiny", [])
  assert preflight.abstract_batch(clip) == {"ids": ((8, 16), "int32"), "pixels": ((8, 30, 30, 3), "float32")}


def test_ar_prior_abstract_batch_has_the_keys_its_task_reads():
  from unclip_jax.stages import ar_prior

  cfg = config_lib.load_config("configs/ar_prior.py:tiny", [])
  spec = preflight.abstract_batch(cfg)
  assert tuple(spec) == ar_prior.KEYS
  assert spec["tokens"] == ((8, cfg.model.text_len), "int32") and spec["text_mask"][1] == "bool"
  assert spec["image_emb"][0] == (8, cfg.model.embedding_dim)


def test_paper_decoder_batch_is_caption_tokens_and_image_embeddings():
  from unclip_jax.stages import decoder

  cfg = config_lib.load_config("configs/decoder.py:paper", [])
  spec = preflight.abstract_batch(cfg)
  assert tuple(spec) == decoder.GLIDE_CLIP_KEYS
  assert spec["tokens"] == ((2048, preflight.CLIP_CONTEXT), "int32") and spec["image_emb"] == ((2048, 1024), "float32")


def test_unsupported_stage_is_a_clear_error():
  cfg = config_lib.load_config("configs/ar_prior.py:tiny", [])
  cfg.stage = "vae"
  with pytest.raises(preflight.PreflightError, match="not 'vae'"):
    preflight.abstract_batch(cfg)


def test_fits_verdict_and_mfu():
  chip = preflight.CHIPS["v5e"]
  row = dict(program="p", topology="v5e:2x2", mesh="4", batch=4, argument_bytes=2 * preflight.GiB, output_bytes=0,
             temp_bytes=10 * preflight.GiB, alias_bytes=0, total_bytes=12 * preflight.GiB, flops_per_chip=197e12,
             est_seconds=2.0, compile_s=1.0)
  ok = preflight.finish_row(row, chip, 4)
  assert ok["fits"] and ok["flops"] == 4 * 197e12 and ok["est_mfu"] == pytest.approx(0.5)
  big = preflight.finish_row(dict(row, total_bytes=17 * preflight.GiB), chip, 4)
  assert not big["fits"] and "DOES NOT FIT" in preflight.table_row(big)
  assert preflight.report([ok]) == 0 and preflight.report([ok, big]) == 1
  none = preflight.finish_row(dict(row, est_seconds=None), chip, 4)
  assert none["est_mfu"] is None and " - " in preflight.table_row(none)


def test_a_program_the_compiler_refuses_does_not_fit():
  class Refused:
    def compile(self):
      raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                         "temporaries (48.02T) exceeds available HBM (15.75G).")
  compiled, row = preflight.compile_or_oom(Refused())
  assert compiled is None and row["total_bytes"] == int(48.02 * 2 ** 40)
  row = preflight.finish_row(dict(row, program="p", topology="v5e:2x2", mesh="4", batch=1), preflight.CHIPS["v5e"], 4)
  assert not row["fits"] and "DOES NOT FIT" in preflight.table_row(row)
  assert preflight.report([row]) == 1

  class Broken:
    def compile(self):
      raise RuntimeError("INTERNAL: something else")
  with pytest.raises(RuntimeError, match="INTERNAL"):
    preflight.compile_or_oom(Broken())


# ---- with libtpu: the CLIs compile for abstract chips -------------------------------------------------------------
def _env():
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1", TPU_ACCELERATOR_TYPE="v5p-8",
             TPU_WORKER_HOSTNAMES="localhost", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  env.pop("XLA_FLAGS", None)
  return env


def _run(args, timeout=600):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=timeout)


def _rows(proc) -> list[dict]:
  lines = [l for l in proc.stdout.splitlines() if l.startswith('{"')]
  assert lines, proc.stdout + proc.stderr[-3000:]
  return json.loads(lines[-1])["preflight"]


FIELDS = {"argument_bytes", "temp_bytes", "total_bytes", "hbm_bytes", "flops", "flops_per_chip", "est_seconds",
          "est_mfu", "compile_s", "fits", "chips", "mesh", "batch", "program", "topology"}


@needs_libtpu
def test_train_cli_bad_topology_is_one_error_line(tmp_path):
  proc = _run(["unclip_jax.train", "--config", "decoder:tiny", "--workdir", str(tmp_path), "--compile_only",
               "--topology", "v5e:3x4", "--config.batch_size=12"], timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "libtpu rejects TPU topology 'v5e:3x4'" in errors[0], proc.stderr[-2000:]


@needs_libtpu
@pytest.mark.slow
def test_train_step_compiles_for_v5e(tmp_path):
  proc = _run(["unclip_jax.train", "--config", "decoder:tiny", "--workdir", str(tmp_path), "--compile_only",
               "--topology", "v5e:2x2", *MICRO_FLAGS])
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  (row,) = _rows(proc)
  assert FIELDS <= set(row)
  assert row["program"] == "train decoder:tiny" and row["chips"] == 4 and row["mesh"] == "4x1x1"
  assert row["hbm_bytes"] == 16 * 2 ** 30 and row["fits"] and 0 < row["total_bytes"] < row["hbm_bytes"]
  # Adam moments + EMA + params: the state is at least 4 copies of the params (replicated on this mesh).
  assert row["argument_bytes"] >= 4 * 4 * row["params"]
  assert row["flops"] > 0 and row["est_seconds"] > 0 and 0 < row["est_mfu"] < 1
  assert "| train decoder:tiny | v5e:2x2 | 4 |" in proc.stdout and "FITS" in proc.stdout
  assert not list(tmp_path.iterdir())                     # compile-only writes no checkpoint


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("config", ["prior:tiny", "ar_prior:tiny"])
def test_prior_train_steps_compile_for_v5e(tmp_path, config):
  proc = _run(["unclip_jax.train", "--config", config, "--workdir", str(tmp_path), "--compile_only",
               "--topology", "v5e:2x2"])
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  (row,) = _rows(proc)
  assert row["program"] == f"train {config}" and row["fits"] and row["flops"] > 0
  # params + EMA + two Adam moments, float32, replicated on this 4x1x1 data-parallel mesh (frozen statistics too)
  assert row["argument_bytes"] >= 4 * 4 * row["params"]


@needs_libtpu
@pytest.mark.slow
def test_paper_decoder_pathway_train_step_compiles_for_v5e(tmp_path):
  """text_encoder glide_clip (GLIDE transformer + CLIP image embedding) on a micro UNet: the transformer's params
  are in the state and the step compiles for 4 chips."""
  proc = _run(["unclip_jax.train", "--config", "decoder:tiny", "--workdir", str(tmp_path), "--compile_only",
               "--topology", "v5e:2x2", *MICRO_FLAGS, "--config.model.text_encoder=glide_clip"])
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  (row,) = _rows(proc)
  assert row["fits"] and row["flops"] > 0
  plain = _run(["unclip_jax.train", "--config", "decoder:tiny", "--workdir", str(tmp_path), "--compile_only",
                "--topology", "v5e:2x2", *MICRO_FLAGS])
  (base,) = _rows(plain)
  assert row["params"] > base["params"]                  # + the 2-layer GLIDE transformer


def _micro_bundle(path: pathlib.Path, decoder_attention: bool = False, decoder_overrides=()) -> pathlib.Path:
  """A bundle of micro stages (zero weights: only the configs matter to a compile)."""
  import helpers

  clip_cfg, prior_cfg, _, _ = helpers.tiny_configs()
  prior_cfg.sampling.steps = "2"
  attention = ["model.attention_levels=(True,)"] if decoder_attention else []
  dec = config_lib.load_config("configs/decoder.py:tiny", MICRO_UNET + attention + ["model.image_size=8",
                                                                                    "sampling.steps='2'",
                                                                                    *decoder_overrides])
  sr = config_lib.load_config("configs/upsampler.py:tiny",
                              MICRO_UNET + ["model.low_res_size=8", "model.image_size=16", "sampling.steps='2'"])
  zeros = lambda cfg: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), bundle.abstract_params(cfg))
  for name, cfg in (("clip", clip_cfg), ("prior", prior_cfg), ("decoder", dec), ("super_res_first", sr),
                    ("super_res_last", sr)):
    bundle.save_component(path, name, cfg, zeros(cfg))
  return path


@needs_libtpu
@pytest.mark.slow
def test_sampling_chain_compiles_for_v5e(tmp_path):
  b = _micro_bundle(tmp_path / "bundle")
  proc = _run(["unclip_jax.sample", "--compile-only", "--topology", "v5e:2x2", "--batch", "4", "--bundle", str(b)])
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  rows = _rows(proc)
  assert [r["program"] for r in rows] == ["sample text", "sample prior", "sample decoder", "sample super_res",
                                          "sample chain"]
  for r in rows:
    assert FIELDS <= set(r) and r["fits"] and r["flops"] > 0 and r["est_seconds"] > 0
  by = {r["program"]: r for r in rows}
  assert by["sample decoder"]["forwards"] == 2 and by["sample super_res"]["forwards"] == 2
  chain = by["sample chain"]
  assert chain["flops"] == pytest.approx(sum(r["flops"] for r in rows[:-1]))
  assert chain["param_bytes"] == sum(r["param_bytes"] for r in rows[:-1])
  assert chain["total_bytes"] >= max(r["total_bytes"] for r in rows[:-1])


@pytest.mark.parametrize("spec,message", [
    ("clip=clip:tiny", "lacks \\['prior', 'decoder'\\]"),
    ("vae=clip:tiny,prior=prior:tiny,decoder=decoder:tiny", "is not component=config"),
    ("clip=prior:tiny,prior=prior:tiny,decoder=decoder:tiny", "is a 'prior' config; clip takes 'clip'"),
    ("clip=clip:nope,prior=prior:tiny,decoder=decoder:tiny", "unknown config variant 'nope'")])
def test_bad_chain_configs_are_clear_errors(spec, message):
  with pytest.raises(preflight.PreflightError, match=message):
    preflight.chain_configs(spec)


def test_karlo_chain_preset_is_the_converted_karlo_layout():
  cfgs = preflight.chain_configs("karlo")
  assert list(cfgs) == list(bundle.COMPONENTS)
  assert cfgs["clip"].model.vision is None and not cfgs["clip"].model.logit_scale    # Karlo: the text tower only
  assert "vision_model" not in bundle.abstract_params(cfgs["clip"])   # builds: a valid text-only CLIP
  assert cfgs["decoder"].variant == "karlo" and cfgs["super_res_last"].variant == "karlo_64_256"
  assert cfgs["prior"].model.num_embeddings == preflight.CLIP_CONTEXT


def test_configs_and_bundle_together_are_refused(tmp_path):
  proc = _run(["unclip_jax.sample", "--compile-only", "--topology", "v5e:2x2", "--configs", "karlo", "--bundle",
               str(tmp_path)], timeout=120)
  assert proc.returncode == 2 and "give one" in proc.stderr, proc.stderr[-2000:]


@needs_libtpu
def test_one_chip_topologies_are_whole_hosts():
  """v5e:1x1 (one chip, the Karlo chain's target) is smaller than a host's default 2x2 block of chips."""
  code = ("from unclip_jax import preflight\n"
          "for name in ('v5e:1x1', 'v6e:1x1', 'v5p:1x1x1', 'v5e:2x2'):\n"
          "  chip, devices = preflight.abstract_devices(name)\n"
          "  print(name, len(devices), devices[0].device_kind == chip.device_kind)\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split("\n")[:4] == ["v5e:1x1 1 True", "v6e:1x1 1 True", "v5p:1x1x1 1 True", "v5e:2x2 4 True"]


@needs_libtpu
@pytest.mark.slow
def test_sampling_chain_from_configs_compiles_for_one_v5e_chip():
  """`--configs` compiles a chain from stage configs alone (no weights on disk), on one v5e chip."""
  spec = ("clip=clip:tiny,prior=prior:tiny,decoder=decoder:tiny,super_res_first=upsampler:tiny")
  overrides = ["--decoder-steps", "2", "--prior-steps", "2", "--sr-steps", "2"]
  proc = _run(["unclip_jax.sample", "--compile-only", "--topology", "v5e:1x1", "--batch", "2", "--configs", spec,
               "--param-dtype", "bfloat16", *overrides])
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  rows = _rows(proc)
  assert [r["program"] for r in rows][-1] == "sample chain" and all(r["fits"] and r["chips"] == 1 for r in rows)
  assert json.loads([l for l in proc.stdout.splitlines() if l.startswith('{"')][-1])["configs"] == spec
  n = sum(int(np.prod(x.shape)) for cfg in preflight.chain_configs(spec).values()
          for x in jax.tree.leaves(bundle.abstract_params(cfg)))
  assert rows[-1]["param_bytes"] == 2 * n                         # bf16 weights, every component resident


@needs_libtpu
@pytest.mark.slow
def test_sampling_chain_with_the_paper_decoder_compiles_for_v5e(tmp_path):
  """A chain whose decoder is the paper's GLIDE + CLIP pathway (the transformer runs once per call, before the
  scan; the scan body is the UNet)."""
  b = _micro_bundle(tmp_path / "bundle", decoder_overrides=["model.text_encoder='glide_clip'", "model.n_vocab=49408"])
  proc = _run(["unclip_jax.sample", "--compile-only", "--topology", "v5e:2x2", "--batch", "4", "--bundle", str(b)])
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  by = {r["program"]: r for r in _rows(proc)}
  assert by["sample decoder"]["fits"] and by["sample decoder"]["forwards"] == 2 and by["sample chain"]["fits"]


def test_sampling_batch_the_chips_do_not_divide(tmp_path):
  proc = _run(["unclip_jax.sample", "--compile-only", "--topology", "v5e:2x2", "--batch", "3"], timeout=120)
  assert proc.returncode == 2 and "not divisible by the 4 chips" in proc.stderr, proc.stderr[-2000:]


@needs_libtpu
@pytest.mark.slow
def test_train_step_on_tpu_runs_the_pallas_splash_kernel(tmp_path):
  """attention "auto" on a TPU topology puts the splash kernels (forward, dq, dk/dv: Mosaic tpu_custom_calls) in
  the compiled train step, inside shard_map over the 4 chips; "xla" has none. One level with attention: a down
  block, two up blocks and the mid block, 4 attention layers."""
  with_attention = [f for f in MICRO_FLAGS if "attention_levels" not in f] + ["--config.model.attention_levels=(True,)"]
  kernels = {}
  for impl in ("auto", "xla"):
    proc = _run(["unclip_jax.train", "--config", "decoder:tiny", "--workdir", str(tmp_path), "--compile_only",
                 "--topology", "v5e:2x2", *with_attention, f"--config.model.attention={impl}"])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    (row,) = _rows(proc)
    assert row["fits"]
    kernels[impl] = row["pallas_kernels"]
  assert kernels == {"auto": 4 * 3, "xla": 0}


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("config,flags,want", [
    ("clip:tiny", [], 4 * 3),                                          # 2 text + 2 vision layers
    ("prior:tiny", ["--config.model.head_dim=8"], 2 * 3),              # 2 layers (the tiny 12-wide heads: XLA)
    ("prior:tiny", ["--config.model.head_dim=8", "--config.model.scan_layers=True"], 3),   # one scanned block
])
def test_clip_and_prior_train_steps_on_tpu_run_the_pallas_splash_kernel(tmp_path, config, flags, want):
  """attention "auto" puts the splash kernels (forward, dq, dk/dv) into the CLIP and prior train steps on a TPU
  topology (~10 s per compile here); "xla" has none."""
  kernels = {}
  for impl in ("auto", "xla"):
    proc = _run(["unclip_jax.train", "--config", config, "--workdir", str(tmp_path / impl), "--compile_only",
                 "--topology", "v5e:2x2", *flags, f"--config.model.attention={impl}"])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    (row,) = _rows(proc)
    assert row["fits"]
    kernels[impl] = row["pallas_kernels"]
  assert kernels == {"auto": want, "xla": 0}


@needs_libtpu
@pytest.mark.slow
def test_sampler_on_tpu_runs_the_pallas_splash_kernel(tmp_path):
  """The decoder's sampling scan on TPU calls the splash forward kernel in each of its 4 attention layers (the
  pipeline traces it under its mesh: shard_map over the rows), the text encoder in each of its 2 layers; the
  tiny prior's 12-wide heads stay on XLA and the upsamplers have no attention."""
  b = _micro_bundle(tmp_path / "bundle", decoder_attention=True)
  proc = _run(["unclip_jax.sample", "--compile-only", "--topology", "v5e:2x2", "--batch", "4", "--bundle", str(b)])
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  by = {r["program"]: r for r in _rows(proc)}
  assert by["sample decoder"]["pallas_kernels"] == 4 and by["sample decoder"]["fits"]
  assert by["sample text"]["pallas_kernels"] == 2 and by["sample prior"]["pallas_kernels"] == 0
  assert by["sample super_res"]["pallas_kernels"] == 0
