"""`python -m unclip_jax.eval SUBCOMMAND ...`: evaluation metrics.

  fid   FID between two image sets (folders / webdataset .tar shards / cached .npz statistics):

    python -m unclip_jax.eval fid --real coco_val/ --fake samples/ \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth [--protocol clean|pytorch-fid] \\
        [--batch-size 50] [--save-real-stats coco_clean.npz] [--json report.json]

    CLIP-FD (clean-fid's CLIP mode: Fréchet distance of CLIP image embeddings), offline with the embedded CLIP:
    python -m unclip_jax.eval fid --features clip [--clip BUNDLE_OR_HF_CLIP] --real real/ --fake samples/

  clip-score   100·max(cos(image, prompt), 0) averaged over image/prompt pairs (torchmetrics' CLIPScore):

    python -m unclip_jax.eval clip-score --images samples/ [--captions captions.jsonl] \\
        [--clip clip-vit-base-patch16/] [--batch-size 64] [--json report.json]

Each prints one JSON line ({"metric": "fid" | "clip_score", ...}). Subcommands live in `SUBCOMMANDS`
(name -> (add_arguments, run)).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Callable

from unclip_jax.eval import fid as fid_lib
from unclip_jax.eval import features as features_lib
from unclip_jax.eval import images as images_lib
from unclip_jax.convert import inception as inception_weights
from unclip_jax.eval import protocols


class CLIError(Exception):
  """A user error: printed as `error: ...` with exit status 2."""


def _add_fid_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--real", required=True,
                 help="reference images: a folder, a .tar shard, a glob of shards, or a .npz statistics cache")
  p.add_argument("--fake", required=True, help="generated images (same kinds of path as --real)")
  p.add_argument("--inception-weights", default=os.environ.get("UNCLIP_JAX_INCEPTION_WEIGHTS"),
                 help=f"pytorch-fid's {inception_weights.FID_WEIGHTS_NAME} (or the same state dict as "
                      ".safetensors); default $UNCLIP_JAX_INCEPTION_WEIGHTS. Not needed when both sides are .npz")
  p.add_argument("--protocol", default=protocols.DEFAULT_PROTOCOL, choices=protocols.PROTOCOLS,
                 help="resize protocol: 'clean' = clean-fid (PIL bicubic of the image to 299x299, (x-128)/128); "
                      "'pytorch-fid' = pytorch-fid (x/255 resized with bilinear F.interpolate, no antialias, "
                      "then 2x-1). Default: %(default)s")
  p.add_argument("--features", default="inception", choices=features_lib.available_feature_extractors(),
                 help="feature extractor (default: %(default)s = InceptionV3 pool3, 2048-d; 'clip' = CLIP image "
                      "embeddings, clean-fid's CLIP mode, with --clip)")
  p.add_argument("--clip", default=None, metavar="PATH",
                 help="with --features clip: a bundle, a bundle's clip component or a transformers CLIP folder "
                      "(default: the embedded bundle's CLIP)")
  p.add_argument("--batch-size", type=int, default=50, help="images per network call (default: %(default)s)")
  p.add_argument("--save-real-stats", default=None, metavar="OUT.npz",
                 help="write the real set's statistics (mu, sigma, n, protocol, features) for reuse as --real")
  p.add_argument("--stats-protocol", default=None, choices=protocols.PROTOCOLS,
                 help="label .npz files that carry no metadata (e.g. pytorch-fid's own mu/sigma files) as "
                      "computed under this protocol with the same Inception weights")
  p.add_argument("--fd-method", default="sqrtm", choices=("sqrtm", "eigh"),
                 help="matrix square root: 'sqrtm' = scipy.linalg.sqrtm as pytorch-fid (default), 'eigh' = "
                      "eigenvalue form (same value, robust for singular covariances)")
  p.add_argument("--json", default=None, metavar="REPORT.json", help="also write the result to this file")
  p.add_argument("--progress", action="store_true", help="show a progress counter on stderr")


def _resolve(path: str, label: str, stats_protocol: str | None, feature_name: str):
  """-> FIDStats (from a .npz) or an ImageSource; errors name the side (--real / --fake)."""
  if path.endswith(".npz"):
    try:
      stats = fid_lib.FIDStats.load(path)
    except (OSError, ValueError) as e:
      raise CLIError(f"{label}: {e}") from e
    if stats.protocol is None and stats_protocol is not None:
      stats.protocol, stats.features = stats_protocol, feature_name
    return stats
  try:
    source = images_lib.open_images(path)
  except images_lib.ImageSourceError as e:
    raise CLIError(f"{label}: {e}") from e
  if len(source) < 2:
    raise CLIError(f"{label}: FID needs at least 2 images, {path} has {len(source)}")
  return source


def run_fid(args: argparse.Namespace) -> dict:
  start = time.perf_counter()
  feature_name = features_lib.feature_name(args.features)
  if args.batch_size < 1:
    raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
  sides = {"real": _resolve(args.real, "--real", args.stats_protocol, feature_name),
           "fake": _resolve(args.fake, "--fake", args.stats_protocol, feature_name)}
  need_images = [k for k, v in sides.items() if isinstance(v, images_lib.ImageSource)]
  stats: dict[str, fid_lib.FIDStats] = {k: v for k, v in sides.items() if isinstance(v, fid_lib.FIDStats)}

  def check_cached(fingerprint):
    for k, v in stats.items():
      try:
        v.check_compatible(args.protocol, feature_name, fingerprint, source=f"--{k} {getattr(args, k)}")
      except fid_lib.StatsMismatchError as e:
        raise CLIError(str(e)) from e

  check_cached(None)  # protocol / features before any weights are read
  extractor = None
  fingerprint = None
  if need_images:
    if args.features == "inception" and not args.inception_weights:
      raise CLIError("--inception-weights is required to compute features (pytorch-fid's "
                     f"{inception_weights.FID_WEIGHTS_NAME}; it is not downloaded)")
    weights = args.clip if args.features == "clip" else args.inception_weights
    try:
      extractor = features_lib.build_feature_extractor(args.features, weights=weights,
                                                       protocol=args.protocol, batch_size=args.batch_size)
    except (inception_weights.InceptionWeightsError, ValueError, OSError) as e:
      raise CLIError(str(e)) from e
    fingerprint = extractor.fingerprint
    check_cached(fingerprint)
  elif stats["real"].fingerprint and stats["fake"].fingerprint \
      and stats["real"].fingerprint != stats["fake"].fingerprint:
    raise CLIError("--real and --fake statistics were computed with different weights "
                   f"({stats['real'].fingerprint} vs {stats['fake'].fingerprint})")
  for k in need_images:
    source = sides[k]
    try:
      feats = extractor.extract(iter(source), total=len(source), progress=args.progress)
    except (images_lib.ImageSourceError, ValueError) as e:
      raise CLIError(f"--{k}: {e}") from e
    stats[k] = fid_lib.FIDStats.from_features(feats, protocol=args.protocol, feature_name=feature_name,
                                              fingerprint=fingerprint, what=f"{k} images")
  for k, s in stats.items():
    if s.n != -1 and s.n < 2:
      raise CLIError(f"--{k}: statistics of {s.n} sample(s); FID needs at least 2")
  if args.save_real_stats:
    stats["real"].save(args.save_real_stats)
  try:
    value = fid_lib.fid_from_stats(stats["real"], stats["fake"], method=args.fd_method)
  except ValueError as e:
    raise CLIError(str(e)) from e
  report = {"metric": "fid", "fid": value, "n_real": stats["real"].n, "n_fake": stats["fake"].n,
            "protocol": args.protocol, "features": feature_name, "fd_method": args.fd_method,
            "real": args.real, "fake": args.fake, "seconds": round(time.perf_counter() - start, 3)}
  if fingerprint or stats["real"].fingerprint:
    report["weights_fingerprint"] = fingerprint or stats["real"].fingerprint  # sha256 prefix of the weights file
  if args.save_real_stats:
    report["saved_real_stats"] = args.save_real_stats
  if args.features == "clip" and extractor is not None:
    report["clip"] = args.clip or "embedded"
  return report


def _add_clip_score_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--images", required=True,
                 help="a folder of images with NNNN.json sidecars holding \"prompt\" (what `python -m "
                      "unclip_jax.sample` writes), webdataset .tar shards (key.png + key.json / key.txt), a glob of "
                      "either, or a folder with --captions")
  p.add_argument("--captions", default=None, metavar="FILE",
                 help=".jsonl ({\"file\": ..., \"caption\": ...} a line) or .csv (header with file and caption "
                      "columns); files relative to --images or matched by file name")
  p.add_argument("--clip", default=None, metavar="PATH",
                 help="a bundle folder (its clip component), a bundle clip component folder, or a transformers "
                      "CLIP folder (e.g. openai/clip-vit-base-patch16 saved locally, as Karlo reports; converted on "
                      "load). Default: the embedded bundle's CLIP")
  p.add_argument("--batch-size", type=int, default=64,
                 help="pairs per device call, sharded over the local devices when it divides (default: "
                      "%(default)s)")
  p.add_argument("--no-verify", action="store_true", help="skip the bundle's sha256 check of its clip component")
  p.add_argument("--scores", default=None, metavar="OUT.jsonl",
                 help="also write one {\"image\", \"prompt\", \"clip_score\"} line per pair")
  p.add_argument("--json", default=None, metavar="REPORT.json", help="also write the result to this file")
  p.add_argument("--progress", action="store_true", help="show a progress counter on stderr")


def run_clip_score(args: argparse.Namespace) -> dict:
  from unclip_jax.eval import clip_score as cs

  start = time.perf_counter()
  if args.batch_size < 1:
    raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
  try:
    pairs = cs.read_pairs(args.images, args.captions)
    clip = cs.load_clip(args.clip, verify=not args.no_verify)
    scorer = cs.CLIPScorer(clip, batch_size=args.batch_size)
    raw, n_truncated = scorer.score_pairs(iter(pairs), progress=args.progress, total=len(pairs))
  except (cs.PairsError, cs.CLIPLoadError, images_lib.ImageSourceError) as e:
    raise CLIError(str(e)) from e
  if n_truncated:
    warnings.warn(f"{n_truncated} of {len(pairs)} prompts are longer than the CLIP's context length "
                  f"{clip.context_length} and were truncated (as every CLIP score implementation must)")
  if args.scores:
    if os.path.dirname(args.scores):
      os.makedirs(os.path.dirname(args.scores), exist_ok=True)
    with open(args.scores, "w") as f:
      for (name, _), prompt, s in zip(_names(pairs.source), pairs.prompts, raw):
        f.write(json.dumps({"image": name, "prompt": prompt, "clip_score": max(float(s), 0.0)}) + "\n")
  report = {"metric": "clip_score", **cs.summarize(raw), "n": int(raw.size), "images": args.images,
            "captions": args.captions, "clip": args.clip or "embedded", "clip_kind": clip.kind,
            "image_size": clip.crop_size, "resize_size": clip.resize_size, "context_length": clip.context_length,
            "n_truncated": n_truncated, "devices": scorer.num_devices, "sharded": scorer.sharded,
            "batch_size": args.batch_size, "seconds": round(time.perf_counter() - start, 3)}
  if clip.fingerprint:
    report["weights_fingerprint"] = clip.fingerprint
  return report


def _names(source: images_lib.ImageSource):
  for f in source.files:
    yield f, None
  for shard, members in source.shards:
    for m in members:
      yield f"{shard}:{m}", None


SUBCOMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], dict]]] = {
    "fid": (_add_fid_arguments, run_fid),
    "clip-score": (_add_clip_score_arguments, run_clip_score),
}
_HELP = {"fid": "Fréchet Inception Distance between two image sets (pytorch-fid / clean-fid protocols); "
                "--features clip: CLIP-FD",
         "clip-score": "CLIP score 100·max(cos(image, prompt), 0) of image/prompt pairs (torchmetrics' CLIPScore)"}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m unclip_jax.eval", description="Evaluation metrics.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name, (add_arguments, _) in SUBCOMMANDS.items():
    add_arguments(sub.add_parser(name, help=_HELP.get(name), description=_HELP.get(name)))
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  formatwarning = warnings.formatwarning
  warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
  try:
    report = SUBCOMMANDS[args.command][1](args)
  except CLIError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  finally:
    warnings.formatwarning = formatwarning
  line = json.dumps(report)
  print(line, flush=True)
  if getattr(args, "json", None):
    if os.path.dirname(args.json):
      os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
      f.write(line + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
