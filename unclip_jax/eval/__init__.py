"""Evaluation metrics as papers report them.

  `python -m unclip_jax.eval fid --real PATH_OR_NPZ --fake PATH --inception-weights \
      pt_inception-2015-12-05-6726825d.pth`
  `python -m unclip_jax.eval fid --features clip [--clip PATH] --real PATH_OR_NPZ --fake PATH`   (CLIP-FD)
  `python -m unclip_jax.eval clip-score --images PATH [--captions FILE] [--clip PATH]`
  `python -m unclip_jax.eval coco --captions captions_val2014.json --images val2014/ --n 30000 --out OUT ...`

Modules:
  fid                  statistics (mu, sigma), the Fréchet distance (pytorch-fid's formula), the `.npz` cache.
  features             the feature-extractor registry ("inception", "clip").
  clip_score           CLIP loading (bundle / component / transformers folder), the batched sharded scorer,
                       image + prompt inputs (sidecar JSON, shards, captions files).
  protocols            the "clean" (clean-fid) and "pytorch-fid" resize/normalise protocols, uint8 -> [299, 299, 3].
  images               folders of images / webdataset .tar shards -> uint8 RGB [H, W, 3].
  coco                 the COCO protocol's pieces: reference image files of the chosen ids, the square resize,
                       the reference-statistics cache key (the steps run in __main__.run_coco).

Importing this package does not import jax or torch; the extractors do when built.
"""
from __future__ import annotations

from unclip_jax.eval.fid import FIDStats, StatsMismatchError, feature_statistics, frechet_distance

__all__ = ["FIDStats", "StatsMismatchError", "feature_statistics", "frechet_distance"]
