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
