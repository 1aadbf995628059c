"""Config loading: variants, overrides and the errors for bad ones."""
import pytest

from unclip_jax import config_lib

STAGE_VARIANTS = {"clip": "tiny", "prior": "tiny", "ar_prior": "tiny", "decoder": "tiny", "upsampler": "tiny"}


@pytest.mark.parametrize("stage", sorted(STAGE_VARIANTS))
def test_every_stage_has_tiny_and_default_variants(stage):
  tiny = config_lib.load_config(f"configs/{stage}.py:tiny")
  default = config_lib.load_config(f"configs/{stage}.py")
  assert tiny.stage == default.stage == stage
  assert tiny.variant == "tiny" and default.variant != "tiny"


def test_overrides_are_typed_and_checked():
  cfg = config_lib.load_config("configs/decoder.py:tiny", ["batch_size=4", "optim.lr=3", "sampling.steps='ddim10'"])
  assert cfg.batch_size == 4 and cfg.optim.lr == 3.0 and isinstance(cfg.optim.lr, float)
  assert cfg.sampling.steps == "ddim10"
  with pytest.raises(KeyError, match="unknown config key 'optim.lrr'"):
    config_lib.load_config("configs/decoder.py:tiny", ["optim.lrr=1"])
  with pytest.raises(KeyError, match="unknown config key 'nope'"):
    config_lib.load_config("configs/decoder.py:tiny", ["nope.x=1"])
  with pytest.raises(ValueError, match="key=value"):
    config_lib.load_config("configs/decoder.py:tiny", ["batch_size"])


def test_bad_variant_and_missing_file():
  with pytest.raises(ValueError, match="unknown config variant 'huge'"):
    config_lib.load_config("configs/prior.py:huge")
  with pytest.raises(FileNotFoundError, match="configs/nope.py"):
    config_lib.load_config("configs/nope.py")


def test_locked_config_rejects_new_fields():
  cfg = config_lib.load_config("configs/prior.py:tiny")
  with pytest.raises(AttributeError):
    cfg.not_a_field = 1


def test_builtin_configs_by_name_from_anywhere(tmp_path, monkeypatch):
  """`stage[:variant]` and `stage.py[:variant]` resolve to the installed configs, whatever the working directory."""
  monkeypatch.chdir(tmp_path)
  assert config_lib.load_config("decoder:tiny").variant == "tiny"
  assert config_lib.load_config("prior.py:shapes").variant == "shapes"
  assert config_lib.load_config("upsampler").variant == "karlo_64_256"
  assert set(config_lib.builtin_names()) >= {"clip", "prior", "ar_prior", "decoder", "upsampler"}
  with pytest.raises(FileNotFoundError, match="built-in configs: .*decoder"):
    config_lib.load_config("nonesuch:tiny")


def test_train_cli_resolves_builtin_config_names():
  from unclip_jax.train.__main__ import resolve_config_args

  args = resolve_config_args(["prog", "--config", "decoder:tiny", "--config.batch_size=2", "--config=prior"])
  assert args[2].endswith("configs/decoder.py:tiny") and args[3] == "--config.batch_size=2"
  assert args[4].startswith("--config=") and args[4].endswith("configs/prior.py")
  with pytest.raises(FileNotFoundError, match="nonesuch"):
    resolve_config_args(["prog", "--config=nonesuch"])


def test_every_field_the_code_reads_is_declared():
  """The decoder's inpainting settings and null text, the UNet fields the converters fill in, and one remat
  setting per stage (top-level remat_policy; no model.remat)."""
  dec = config_lib.load_config("decoder:tiny")
  assert dec.sampling.inpaint_method == "auto" and dec.sampling.resample_jumps == 1 and dec.null_text == "zeros"
  for stage in ("decoder", "upsampler"):
    model = config_lib.load_config(f"{stage}:tiny").model
    for key in ("time_embed_dim", "flip_sin_to_cos", "freq_shift", "center_input_sample", "attention"):
      assert key in model, (stage, key)
  for stage in config_lib.STAGES:
    cfg = config_lib.load_config(f"{stage}:tiny")
    assert "remat_policy" in cfg and "remat" not in cfg.model, stage


def test_complete_fills_new_fields_migrates_and_rejects_unknown():
  saved = config_lib.to_dict(config_lib.load_config("decoder:tiny"))
  del saved["null_text"], saved["sampling"]["inpaint_method"], saved["model"]["attention"]   # an older config
  cfg = config_lib.complete(saved)
  assert cfg.null_text == "zeros" and cfg.sampling.inpaint_method == "auto" and cfg.model.attention == "auto"
  assert cfg.model.block_out_channels == (16, 32, 48)                                        # saved values kept
  old_prior = config_lib.to_dict(config_lib.load_config("prior:tiny"))
  old_prior["model"]["remat"] = True                                                         # the old remat name
  assert config_lib.complete(old_prior).remat_policy == "full"
  saved["model"]["not_a_field"] = 1
  with pytest.raises(KeyError, match="model.not_a_field"):
    config_lib.complete(saved)
  with pytest.raises(ValueError, match="stage"):
    config_lib.complete({"stage": "nonesuch"})
