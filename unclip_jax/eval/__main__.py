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

  coco   the MS-COCO protocol end to end (see eval/coco.py): COCO captions -> resumable batch sampling into
         OUT/samples -> FID against the val images of the chosen ids (statistics cached in OUT) + CLIP score:

    python -m unclip_jax.eval coco --captions captions_val2014.json --images val2014/ --n 30000 --seed 0 \\
        --out runs/coco30k [--bundle B] [--inception-weights pt_inception-2015-12-05-6726825d.pth | --features clip] \\
        [--clip CLIP] [--protocol clean|pytorch-fid] [--reference ids|all] [sampling flags of the sample CLI]

Each prints one JSON line ({"metric": "fid" | "clip_score" | "coco", ...}; coco also writes OUT/report.json).
Subcommands live in `SUBCOMMANDS` (name -> (add_arguments, run)).
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
  """A user error: printed as `error: ...` with exit status `code` (2)."""

  def __init__(self, message: str, code: int = 2):
    super().__init__(message)
    self.code = code


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


class _Forwarded:
  """An argument group whose options are also recorded (dest, option, takes a value) for forwarding to
  `python -m unclip_jax.sample` (so the coco command's sampling flags are the sample CLI's, not a copy)."""

  def __init__(self, group, record: list):
    self.group, self.record = group, record

  def add_argument(self, *names, **kwargs):
    action = self.group.add_argument(*names, **kwargs)
    self.record.append((action.dest, action.option_strings[0], action.nargs != 0))
    return action


def _add_coco_arguments(p: argparse.ArgumentParser) -> None:
  from unclip_jax import sample as sample_cli
  from unclip_jax.eval import coco

  p.add_argument("--captions", required=True, metavar="captions_val2014.json",
                 help="COCO caption annotations; --n image ids drawn with --seed, one random caption each (the "
                      "sample CLI's --coco-captions)")
  p.add_argument("--images", required=True, metavar="val2014/",
                 help="the split's image folder (COCO_val2014_<id:012d>.jpg, or the captions' \"images\" "
                      "file_name); searched recursively")
  p.add_argument("--n", type=int, default=30000, help="image ids / samples (default: %(default)s)")
  p.add_argument("--seed", type=int, default=0, help="draws the ids and captions, and the sampling noise")
  p.add_argument("--out", required=True, help="OUT/samples, OUT/real_stats-<key>.npz, OUT/report.json")
  p.add_argument("--reference", default="ids", choices=coco.REFERENCES,
                 help="FID reference: 'ids' = the val images of the chosen ids (default), 'all' = every image of "
                      "--images (e.g. the full 40,504-image val2014)")
  p.add_argument("--real-resize", default="center-crop", choices=coco.REAL_RESIZES,
                 help="'center-crop' (default): reference images -> shortest side --real-size (PIL bicubic), centre "
                      "crop, like the square samples; 'none': as stored (the FID protocol squashes them to 299²)")
  p.add_argument("--real-size", type=int, default=None, help="square side of the reference images (default: the "
                                                               "samples' size)")
  p.add_argument("--features", default="inception", choices=features_lib.available_feature_extractors(),
                 help="FID features: 'inception' (default, with --inception-weights) or 'clip' (CLIP-FD, --fid-clip)")
  p.add_argument("--inception-weights", default=os.environ.get("UNCLIP_JAX_INCEPTION_WEIGHTS"),
                 help=f"pytorch-fid's {inception_weights.FID_WEIGHTS_NAME} (default $UNCLIP_JAX_INCEPTION_WEIGHTS)")
  p.add_argument("--protocol", default=protocols.DEFAULT_PROTOCOL, choices=protocols.PROTOCOLS,
                 help="FID resize protocol (as `fid --protocol`; default: %(default)s)")
  p.add_argument("--fd-method", default="sqrtm", choices=("sqrtm", "eigh"), help="as `fid --fd-method`")
  p.add_argument("--clip", default=None, metavar="PATH",
                 help="CLIP of the CLIP score (e.g. clip-vit-base-patch16/ as Karlo reports; default: the embedded "
                      "bundle's)")
  p.add_argument("--fid-clip", default=None, metavar="PATH", help="with --features clip: its CLIP (default: --clip)")
  p.add_argument("--eval-batch-size", type=int, default=64, help="images per feature / CLIP call (default: "
                                                                   "%(default)s)")
  p.add_argument("--no-progress", action="store_true", help="hide the progress bars (stage lines stay on stderr)")
  forwarded: list = []
  g = _Forwarded(p.add_argument_group("sampling (passed to python -m unclip_jax.sample; its defaults)"), forwarded)
  g.add_argument("--bundle", default=None, help="model bundle (default: the embedded model)")
  g.add_argument("--batch-size", type=int, default=None, help="sampled images per batch (sample default 8)")
  g.add_argument("--candidates", type=int, default=None, help="draw N per image, keep the best CLIP score")
  g.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16"))
  g.add_argument("--format", default=None, choices=("png", "webdataset"), help="samples as png files or tar shards")
  g.add_argument("--shard-size", type=int, default=None)
  g.add_argument("--compilation-cache", default=None, metavar="DIR")
  g.add_argument("--distributed", default=None, choices=("auto", "on", "off"),
                 help="split the sampling over every process (metrics are computed by process 0)")
  g.add_argument("--no-verify", action="store_true", help="skip the bundle's (and --clip bundle's) sha256 check")
  sample_cli._stage_flags(g)
  p.set_defaults(sample_forward=tuple(forwarded))


def _say(message: str) -> None:
  print(f"coco: {message}", file=sys.stderr, flush=True)


def _sample_argv(args: argparse.Namespace, samples: str) -> list[str]:
  argv = ["generate", "--coco-captions", args.captions, "--n", str(args.n), "--seed", str(args.seed), "--out",
          samples, "--no-grid"]
  if args.no_progress:
    argv.append("--no-progress")
  for dest, option, takes_value in args.sample_forward:
    value = getattr(args, dest)
    if takes_value and value is not None:
      argv += [option, str(value)]
    elif not takes_value and value:
      argv.append(option)
  return argv


def _save_atomic_stats(stats: fid_lib.FIDStats, path: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  stats.save(tmp)
  os.replace(tmp, path)


def run_coco(args: argparse.Namespace) -> dict:
  """COCO captions -> resumable batch sampling -> FID vs the val images + CLIP score; writes OUT/report.json."""
  import contextlib
  import pathlib
  import shlex

  from unclip_jax import sample as sample_cli
  from unclip_jax.eval import clip_score as cs
  from unclip_jax.eval import coco
  from unclip_jax.inference import job as job_lib

  start = time.perf_counter()
  progress = not args.no_progress
  out = pathlib.Path(args.out)
  samples = str(out / "samples")
  for name in ("n", "eval_batch_size", "real_size"):
    value = getattr(args, name)
    if value is not None and value < (2 if name == "n" else 1):
      raise CLIError(f"--{name.replace('_', '-')} must be >= {2 if name == 'n' else 1}, got {value}")
  if args.features == "clip" and args.protocol != "clean":
    raise CLIError("--features clip uses CLIP's own preprocessing; use --protocol clean")
  if args.fid_clip and args.features != "clip":
    raise CLIError("--fid-clip is the CLIP of --features clip; with --features inception use --inception-weights")
  if args.features == "inception" and not args.inception_weights:
    raise CLIError("--inception-weights is required for --features inception (pytorch-fid's "
                   f"{inception_weights.FID_WEIGHTS_NAME}; it is not downloaded), or use --features clip")

  # ---- every input is checked before any model runs
  sample_argv = _sample_argv(args, samples)
  try:
    prompts = sample_cli.read_prompt_set(sample_cli.parse_args(sample_argv))
  except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError) as e:
    raise CLIError(f"--captions: {e}") from e
  try:
    if args.reference == "ids":
      files = coco.reference_files([int(i) for i in prompts.ids], args.images,
                                   coco.file_names_from_captions(args.captions))
    else:
      if not os.path.isdir(args.images):
        raise coco.CocoError(f"--images: not a folder: {args.images}")
      files = list(images_lib.open_images(args.images).files)
  except (coco.CocoError, images_lib.ImageSourceError) as e:
    raise CLIError(str(e)) from e
  if len(files) < 2:
    raise CLIError(f"--images: FID needs at least 2 reference images, {args.images} has {len(files)}")
  fid_clip = args.fid_clip or args.clip
  try:
    extractor = features_lib.build_feature_extractor(
        args.features, weights=fid_clip if args.features == "clip" else args.inception_weights,
        protocol=args.protocol, batch_size=args.eval_batch_size)
    clip = cs.load_clip(args.clip, verify=not args.no_verify)
  except (inception_weights.InceptionWeightsError, cs.CLIPLoadError, ValueError, OSError) as e:
    raise CLIError(str(e)) from e
  feature_name = extractor.name
  timings: dict[str, float] = {}

  # ---- 1. samples (resumable: finished batches are skipped)
  _say(f"[1/4] sampling {args.n} images into {samples} (`python -m unclip_jax.sample {shlex.join(sample_argv)}`)")
  t = time.perf_counter()
  with contextlib.redirect_stdout(sys.stderr):
    rc = sample_cli.main(sample_argv)
  timings["sampling_s"] = round(time.perf_counter() - t, 3)
  if rc == job_lib.PREEMPTED_EXIT_CODE:
    raise CLIError("preempted while sampling; rerun the same command to resume", code=rc)
  if rc != 0:
    raise CLIError(f"sampling into {samples} failed (exit status {rc}; the sample CLI's error is above)", code=rc)
  import jax

  if jax.process_index() != 0:
    return {"metric": "coco", "process": jax.process_index(), "samples": samples,
            "note": "sampling done; the metrics are computed by process 0"}
  summary = json.loads((out / "samples" / job_lib.SUMMARY).read_text())
  manifest = json.loads((out / "samples" / job_lib.MANIFEST).read_text())
  try:
    fake = images_lib.open_images(samples)
  except images_lib.ImageSourceError as e:
    raise CLIError(str(e)) from e
  if len(fake) != args.n:
    raise CLIError(f"{samples} holds {len(fake)} images, expected the {args.n} samples (other images in it?)")
  size = args.real_size or int(next(iter(fake))[1].shape[0])

  # ---- 2. reference statistics (cached in OUT)
  record = coco.reference_record(reference=args.reference, images=args.images, files=files,
                                 resize=args.real_resize, size=size, features=feature_name, protocol=args.protocol,
                                 fingerprint=extractor.fingerprint)
  stats_path = str(out / f"real_stats-{coco.record_key(record)}.npz")
  t = time.perf_counter()
  cached = os.path.isfile(stats_path)
  reference = images_lib.ImageSource(description=args.images, files=tuple(files))
  if cached:
    _say(f"[2/4] reference statistics: cached {stats_path}")
  else:
    _say(f"[2/4] reference statistics of {len(files)} images ({args.reference}, {args.real_resize} {size}², "
         f"{feature_name}, protocol {args.protocol}) -> {stats_path}")
    try:
      feats = extractor.extract(coco.resized(iter(reference), args.real_resize, size), total=len(reference),
                                progress=progress)
    except (images_lib.ImageSourceError, ValueError) as e:
      raise CLIError(f"--images: {e}") from e
    stats = fid_lib.FIDStats.from_features(feats, protocol=args.protocol, feature_name=feature_name,
                                           fingerprint=extractor.fingerprint, what="reference images")
    _save_atomic_stats(stats, stats_path)
    job_lib.write_atomic(pathlib.Path(stats_path[:-4] + ".json"), json.dumps(record, indent=1).encode())
  timings["reference_stats_s"] = round(time.perf_counter() - t, 3)

  # ---- 3. FID: exactly `python -m unclip_jax.eval fid --real <cache> --fake OUT/samples`
  fid_argv = ["fid", "--real", stats_path, "--fake", samples, "--features", args.features, "--protocol",
              args.protocol, "--fd-method", args.fd_method, "--batch-size", str(args.eval_batch_size)]
  if args.features == "inception":
    fid_argv += ["--inception-weights", args.inception_weights]
  elif fid_clip:
    fid_argv += ["--clip", fid_clip]
  _say(f"[3/4] FID of the samples ({feature_name})")
  t = time.perf_counter()
  fid_report = run_fid(build_parser().parse_args(fid_argv + (["--progress"] if progress else [])))
  timings["fid_s"] = round(time.perf_counter() - t, 3)

  # ---- 4. CLIP score of the samples (and of the reference images with the same captions)
  clip_argv = ["clip-score", "--images", samples, "--batch-size", str(args.eval_batch_size), "--scores",
               str(out / "clip_scores.jsonl")] + (["--clip", args.clip] if args.clip else []) + \
              (["--no-verify"] if args.no_verify else [])
  _say("[4/4] CLIP score of the samples" + (" and the reference images" if args.reference == "ids" else ""))
  t = time.perf_counter()
  cs_report = run_clip_score(build_parser().parse_args(clip_argv + (["--progress"] if progress else [])))
  real_clip = None
  if args.reference == "ids":
    real_record = coco.reference_record(reference="ids", images=args.images, files=files, resize=args.real_resize,
                                        size=size, features="clip-score", protocol="clip",
                                        fingerprint=clip.fingerprint, captions_sha256=prompts.digest())
    real_path = out / f"real_clip_score-{coco.record_key(real_record)}.json"
    if real_path.is_file():
      real_clip = json.loads(real_path.read_text())["summary"]
    else:
      scorer = cs.CLIPScorer(clip, batch_size=args.eval_batch_size)
      pairs = ((name, image, caption) for (name, image), caption
               in zip(coco.resized(iter(reference), args.real_resize, size), prompts.captions))
      try:
        raw, _ = scorer.score_pairs(pairs, progress=progress, total=len(files))
      except (cs.PairsError, images_lib.ImageSourceError) as e:
        raise CLIError(f"--images: {e}") from e
      real_clip = {**cs.summarize(raw), "n": int(raw.size)}
      job_lib.write_atomic(real_path, json.dumps({"record": real_record, "summary": real_clip}, indent=1).encode())
  timings["clip_score_s"] = round(time.perf_counter() - t, 3)
  timings["total_s"] = round(time.perf_counter() - start, 3)

  report = {
      "metric": "coco", "n": args.n, "seed": args.seed, "captions": args.captions, "images": args.images,
      "out": str(out), "fid": fid_report["fid"], "clip_score": cs_report["clip_score"],
      "clip_score_std": cs_report["clip_score_std"],
      "clip_score_real": real_clip["clip_score"] if real_clip else None,
      "features": feature_name, "protocol": args.protocol, "fd_method": args.fd_method,
      "clip": args.clip or "embedded", "clip_weights_fingerprint": clip.fingerprint,
      "reference": {"mode": args.reference, "n": len(files), "resize": args.real_resize, "size": size,
                    "stats": stats_path, "cached": cached, "fingerprint": extractor.fingerprint},
      "settings": manifest["record"],   # bundle (+ sha256 of its bundle.json), sampler settings, dtype, layout
      "sampling": {"out": samples, "images": summary["images"], "images_this_run": summary["images_this_run"],
                   "images_per_s": summary["images_per_s"]},
      "timings": timings,
      "commands": [shlex.join(["python", "-m", "unclip_jax.sample", *sample_argv]),
                   shlex.join(["python", "-m", "unclip_jax.eval", *fid_argv]),
                   shlex.join(["python", "-m", "unclip_jax.eval", *clip_argv])],
      "fid_report": fid_report, "clip_score_report": cs_report, "clip_score_real_report": real_clip,
  }
  job_lib.write_atomic(out / "report.json", json.dumps(report, indent=1).encode())
  return report


SUBCOMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], dict]]] = {
    "fid": (_add_fid_arguments, run_fid),
    "clip-score": (_add_clip_score_arguments, run_clip_score),
    "coco": (_add_coco_arguments, run_coco),
}
_HELP = {"fid": "Fréchet Inception Distance between two image sets (pytorch-fid / clean-fid protocols); "
                "--features clip: CLIP-FD",
         "clip-score": "CLIP score 100·max(cos(image, prompt), 0) of image/prompt pairs (torchmetrics' CLIPScore)",
         "coco": "the MS-COCO protocol in one resumable command: COCO captions -> batch sampling -> FID against the "
                 "val images of the chosen ids + CLIP score; OUT/report.json"}


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
    return e.code
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
