"""The models embedded in the package (`unclip_jax/assets/`), by name: `--model NAME` in the sample CLI, the demo and
the binding report; `--bundle FOLDER` is any other bundle. No jax import (the CLIs' --help stays fast)."""
from __future__ import annotations

import argparse
import pathlib

ASSETS = pathlib.Path(__file__).resolve().parent / "assets"
DEFAULT = "shapes"
MODELS = {   # name -> (folder under assets/, what it draws)
    "shapes": ("default_bundle", "one captioned shape, 64² (MODEL_CARD.md)"),
    "shapes2": ("shapes2_bundle", "two captioned shapes side by side or stacked, 96², the attribute-binding study "
                                  "(docs/binding.md)"),
}


def path(name: str = DEFAULT) -> pathlib.Path:
  """Folder of the embedded model `name` (it may be absent from a stripped installation; see `resolve`)."""
  if name not in MODELS:
    raise ValueError(f"unknown embedded model {name!r}; choose one of {', '.join(MODELS)}")
  return ASSETS / MODELS[name][0]


def add_argument(p: argparse.ArgumentParser) -> None:
  """--model NAME, the alternative to --bundle FOLDER."""
  p.add_argument("--model", choices=tuple(MODELS), default=None,
                 help="an embedded model instead of --bundle: " + "; ".join(f"{k}: {v[1]}" for k, v in MODELS.items())
                      + f" (default without --bundle: {DEFAULT})")


def resolve(bundle: str | None, model: str | None) -> str | pathlib.Path:
  """The bundle to load: `bundle` (a folder or URL, returned as given) or the embedded `model` (default DEFAULT).
  Errors: both given; the embedded model missing from this installation."""
  if bundle and model:
    raise ValueError(f"give --bundle or --model, not both (got --bundle {bundle} and --model {model})")
  if bundle:
    return bundle
  folder = path(model or DEFAULT)
  if not folder.is_dir():
    raise FileNotFoundError(f"this installation has no embedded model {model or DEFAULT!r} at {folder}; pass "
                            f"--bundle, or convert one with `python -m unclip_jax.convert`")
  return folder
