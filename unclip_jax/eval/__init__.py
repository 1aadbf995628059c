"""Evaluation metrics as papers report them.

  `python -m unclip_jax.eval fid --real PATH_OR_NPZ --fake PATH --inception-weights pt_inception-2015-12-05-6726825d.pth`

Modules:
  fid                  statistics (mu, sigma), the Fréchet distance (pytorch-fid's formula), the `.npz` cache.
  features             the feature-extractor registry ("inception"; CLIP features can register alongside).
  protocols            the "clean" (clean-fid) and "pytorch-fid" resize/normalise protocols, uint8 -> [299, 299, 3].
  images               folders of images / webdataset .tar shards -> uint8 RGB [H, W, 3].

Importing this package does not import jax or torch; the extractors do when built.
"""
from __future__ import annotations

from unclip_jax.eval.fid import FIDStats, StatsMismatchError, feature_statistics, frechet_distance

__all__ = ["FIDStats", "StatsMismatchError", "feature_statistics", "frechet_distance"]
