"""The embedded models (`unclip_jax.embedded`): choosing one by name (`--model`), clear errors, the package's size."""
import pathlib

import pytest

from unclip_jax import embedded, sample

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_resolve_names_and_errors(tmp_path):
  assert embedded.resolve(None, None) == embedded.path("shapes") == sample.DEFAULT_BUNDLE
  assert embedded.resolve(str(tmp_path), None) == str(tmp_path)          # a folder or URL is returned as given
  with pytest.raises(ValueError, match="not both"):
    embedded.resolve(str(tmp_path), "shapes")
  with pytest.raises(ValueError, match="unknown embedded model 'shapes3'"):
    embedded.path("shapes3")


def test_missing_embedded_model_is_one_error_before_loading(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(embedded, "ASSETS", tmp_path / "stripped")
  assert sample.main(["--prompt", "a red circle on a white background", "--out", str(tmp_path / "o"),
                      "--model", "shapes2"]) == 2
  assert "no embedded model 'shapes2'" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()
  assert sample.main(["--prompt", "x", "--out", str(tmp_path / "o"), "--model", "shapes",
                      "--bundle", str(tmp_path)]) == 2
  assert "not both" in capsys.readouterr().err


def test_every_embedded_model_is_present_and_the_assets_stay_under_40_mb():
  from unclip_jax import bundle

  for name in embedded.MODELS:
    assert bundle.verify_bundle(embedded.path(name)) == ["clip", "prior", "decoder", "super_res_first"], name
  size = sum(f.stat().st_size for f in embedded.ASSETS.rglob("*") if f.is_file())
  assert size < 40 * 2**20, f"the package's assets are {size / 2**20:.1f} MB (limit 40 MB)"
