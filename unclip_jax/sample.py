"""`python -m unclip_jax.sample`: text to images with an unCLIP bundle, and the image manipulations.

  python -m unclip_jax.sample --prompt "a red circle on a white background" --out DIR [--bundle B] [--seed 0]
  python -m unclip_jax.sample --prompts-file prompts.txt --out DIR [--images-per-prompt 2] [--candidates 4]
  python -m unclip_jax.sample variations  --image IMG [--n 4] [--eta 1.0] --out DIR
  python -m unclip_jax.sample interpolate --image A --image-b B [--n 5] [--latent slerp|fixed] --out DIR
  python -m unclip_jax.sample text-diff   --image IMG --caption "..." --target "..." [--n 5] --out DIR
  python -m unclip_jax.sample inpaint     --image IMG --mask MASK --prompt "..." [--n 1] --out DIR

--bundle is a folder written by `python -m unclip_jax.convert` (a converted Karlo folder, or our trained stages);
without it the model embedded in the package is used. Per-stage sampler settings (--prior-steps 25,
--prior-guidance 4.0, --decoder-steps 25, --decoder-guidance 8.0, --sr-steps 7, --*-sampler ddpm|ddim, --*-eta)
default to the bundle's configs. The bundle's files are first checked against the sha256 record in its
bundle.json (a damaged file is an error naming it; --no-verify skips the check, for multi-GB bundles). Writes
0000.png, 0001.png, ... in order (one per image, at the final size), 0000.json ... with the prompt and every
setting of that image, and grid.png. Prompts files: .txt one prompt a line; .jsonl / .csv / .parquet with a caption
column; or --coco-captions captions_val2014.json --n 30000 (FID-30k).

Text to image runs as a resumable batch job (unclip_jax/inference/job.py): image k of prompt p is a function of
(seed, p, k, model, settings) only; under jax.distributed (launch/gpu.sh with UNCLIP_MODULE=unclip_jax.sample, a
TPU pod) the work is split over every process; rerunning the same command resumes; SIGTERM exits 143 after
recording the batch in flight; --format webdataset writes tar shards; OUT/summary.json has images/s.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import pathlib
import sys
from typing import Any, Sequence

import numpy as np

COMMANDS = ("generate", "variations", "interpolate", "text-diff", "inpaint")
DEFAULT_BUNDLE = pathlib.Path(__file__).resolve().parent / "assets" / "default_bundle"


def _stage_flags(p: argparse.ArgumentParser) -> None:
  for stage, flag in (("prior", "prior"), ("decoder", "decoder"), ("super_res", "sr")):
    p.add_argument(f"--{flag}-steps", dest=f"{stage}.steps", default=None, help=f"{stage} respacing, e.g. 25, ddim50")
    p.add_argument(f"--{flag}-sampler", dest=f"{stage}.sampler", choices=("ddpm", "ddim"), default=None)
    p.add_argument(f"--{flag}-eta", dest=f"{stage}.eta", type=float, default=None, help="DDIM η")
    if stage != "super_res":
      p.add_argument(f"--{flag}-guidance", dest=f"{stage}.guidance_scale", type=float, default=None,
                     help="classifier-free guidance scale")
  p.add_argument("--decoder-text-guidance", dest="decoder.text_guidance_scale", type=float, default=None,
                 help="a separate guidance scale for the text: three branches [uncond; CLIP image; image + text], "
                      "u + s·(i − u) + s_text·(c − i) with s = --decoder-guidance")


def parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--out", required=True, help="output folder (created)")
  common.add_argument("--bundle", default=None, help="model bundle folder (default: the embedded model)")
  common.add_argument("--seed", type=int, default=0)
  common.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                      help="compute dtype (auto: float32 on CPU, bfloat16 on accelerators)")
  common.add_argument("--compilation-cache", default=None, metavar="DIR",
                      help="persistent XLA compilation cache: later runs of the same shapes skip compiling (default: "
                           "$UNCLIP_JAX_CACHE, else ~/.cache/unclip_jax/xla; '' disables)")
  common.add_argument("--no-verify", action="store_true",
                      help="skip checking the bundle's files against the size + sha256 record in its bundle.json "
                           "(on by default, about 1 ms per MB: worth skipping only for multi-GB bundles); a damaged "
                           "bundle is otherwise an error naming the file")
  common.add_argument("--batch-invariant", choices=("auto", "on", "off"), default="auto",
                      help="evaluate the networks one row at a time, so an image is bitwise the same whatever the "
                           "batch size, device or host count, or resume point (auto: on on CPU, where it costs "
                           "little; off on accelerators, which need the batch to be fast)")
  common.add_argument("--no-progress", action="store_true", help="hide the per-stage progress bars")
  common.add_argument("--no-grid", action="store_true", help="do not write grid.png")
  _stage_flags(common)
  p = argparse.ArgumentParser(prog="python -m unclip_jax.sample", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  sub = p.add_subparsers(dest="command", required=True)
  g = sub.add_parser("generate", parents=[common], help="text to images (the default command)")
  src = g.add_mutually_exclusive_group(required=True)
  src.add_argument("--prompt", help="one prompt")
  src.add_argument("--prompts-file", help=".txt (one prompt a line, blank lines skipped), or .jsonl / .csv / "
                   ".parquet with a caption column and an optional id column")
  src.add_argument("--coco-captions", metavar="JSON", help="COCO caption annotations (captions_val2014.json): "
                   "--n image ids drawn with --seed, one random caption each (the FID-30k protocol)")
  g.add_argument("--n", type=int, default=30000, help="--coco-captions: how many image ids (default 30000)")
  g.add_argument("--caption-column", default=None, help="tables: the caption column (default caption|prompt|text)")
  g.add_argument("--id-column", default=None, help="tables: the id column (default id|key|image_id, else row number)")
  g.add_argument("--images-per-prompt", type=int, default=1)
  g.add_argument("--batch-size", type=int, default=8, help="output images per batch (per process; x candidates "
                 "sampled rows); does not change the images")
  g.add_argument("--candidates", type=int, default=1, help="draw N per image and keep the best CLIP score")
  g.add_argument("--format", choices=("png", "webdataset"), default="png",
                 help="png: OUT/0000.png + 0000.json ...; webdataset: OUT/shard-000000.tar ... (--shard-size images)")
  g.add_argument("--shard-size", type=int, default=None,
                 help="images per work unit / tar shard (default: --batch-size for png, 1000 for webdataset)")
  g.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                 help="jax.distributed.initialize() (auto: when launch/gpu.sh, a TPU pod or SLURM is detected); the "
                      "prompts are split across every process")
  v = sub.add_parser("variations", parents=[common], help="variations of an image")
  v.add_argument("--image", required=True)
  v.add_argument("--n", type=int, default=4)
  v.add_argument("--eta", type=float, default=1.0, help="DDIM η of the decoder (0 reconstructs the image)")
  v.add_argument("--latent", choices=("inverted", "noise"), default="inverted",
                 help="inverted: the image's DDIM latent (paper); noise: fresh noise (diffusers' variation pipeline)")
  i = sub.add_parser("interpolate", parents=[common], help="interpolate between two images")
  i.add_argument("--image", required=True)
  i.add_argument("--image-b", required=True)
  i.add_argument("--n", type=int, default=5)
  i.add_argument("--latent", choices=("slerp", "fixed"), default="slerp")
  t = sub.add_parser("text-diff", parents=[common], help="edit an image toward a caption change")
  t.add_argument("--image", required=True)
  t.add_argument("--caption", required=True, help="what the image shows now")
  t.add_argument("--target", required=True, help="what it should show")
  t.add_argument("--n", type=int, default=5)
  t.add_argument("--max-theta", type=float, default=0.5)
  n = sub.add_parser("inpaint", parents=[common], help="fill the masked-out region from a prompt")
  n.add_argument("--image", required=True)
  n.add_argument("--mask", required=True, help="mask image of the same size: white = keep, black = fill")
  n.add_argument("--prompt", required=True)
  n.add_argument("--n", type=int, default=1)
  n.add_argument("--inpaint-method", dest="decoder.inpaint_method", choices=("auto", "glide", "repaint"),
                 default=None, help="auto: GLIDE's inpaint channels when the decoder has them, else RePaint")
  n.add_argument("--resample-jumps", dest="decoder.resample_jumps", type=int, default=None,
                 help="RePaint's renoise/denoise repetitions per step (r >= 1)")
  return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
    argv = ["generate"] + argv
  return parser().parse_args(argv)


def read_prompt_set(args: argparse.Namespace):
  """--prompt / --prompts-file / --coco-captions -> a `prompt_sets.PromptSet`."""
  from unclip_jax.inference import prompt_sets

  if args.prompt is not None:
    if not args.prompt.strip():
      raise ValueError("the prompt is empty")
    return prompt_sets.PromptSet(["0"], [args.prompt], dict(format="prompt"))
  if args.coco_captions is not None:
    return prompt_sets.read_coco(args.coco_captions, args.n, args.seed)
  return prompt_sets.read(args.prompts_file, caption_column=args.caption_column, id_column=args.id_column)


def read_prompts(args: argparse.Namespace) -> list[str]:
  return read_prompt_set(args).captions


def sampling_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
  out: dict[str, dict[str, Any]] = {}
  for key, value in vars(args).items():
    if "." in key and value is not None:
      stage, field = key.split(".")
      out.setdefault(stage, {})[field] = value
  return out


def resolve_dtype(name: str) -> str:
  if name != "auto":
    return name
  import jax

  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def write_outputs(out: pathlib.Path, images: np.ndarray, metas: list[dict], grid: bool = True) -> list[pathlib.Path]:
  """0000.png + 0000.json per image (in order) and grid.png."""
  from PIL import Image

  from unclip_jax.inference.images import image_grid

  out.mkdir(parents=True, exist_ok=True)
  paths = []
  for k, (image, meta) in enumerate(zip(images, metas)):
    path = out / f"{k:04d}.png"
    _save_png(Image.fromarray(np.asarray(image, np.uint8)), path)
    (out / f"{k:04d}.json").write_text(json.dumps(meta, indent=1, default=str))
    paths.append(path)
  if grid and len(images):
    _save_png(Image.fromarray(image_grid(np.asarray(images, np.float32) / 127.5 - 1.0)), out / "grid.png")
  return paths


def _save_png(image, path) -> None:
  """PIL save; a `gs://` path gets one upload of the encoded PNG."""
  from unclip_jax import paths as paths_lib

  if not paths_lib.is_remote(path):
    image.save(path)
    return
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  path.write_bytes(buf.getvalue())


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--compile-only" in argv:          # TPU preflight: compile the chain for a topology, run nothing
    from unclip_jax import preflight

    return preflight.sample_main(argv)
  args = parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  try:
    return _run(args)
  except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


def _run(args: argparse.Namespace) -> int:
  from unclip_jax import distributed
  from unclip_jax.inference import manipulations as M

  # Every input is read and checked before any model is loaded or run.
  inputs: dict[str, Any] = {}
  if args.command == "generate":
    inputs["prompts"] = read_prompt_set(args)
    for name in ("images_per_prompt", "batch_size", "candidates", "shard_size"):
      if getattr(args, name) is not None and getattr(args, name) < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  else:
    inputs["image"] = M.load_image(args.image)
    if args.command == "interpolate":
      inputs["image_b"] = M.load_image(args.image_b)
    if args.command == "inpaint":
      inputs["mask"] = M.load_mask(args.mask, inputs["image"].shape)
    if args.n < 1:
      raise ValueError(f"--n must be >= 1, got {args.n}")
  from unclip_jax import paths as paths_lib

  bundle_path = paths_lib.as_path(args.bundle) if args.bundle else DEFAULT_BUNDLE
  if args.bundle and paths_lib.is_remote(args.bundle):      # unreachable URLs fail here, before any model loads
    paths_lib.check_reachable(args.bundle, "--bundle")
  if paths_lib.is_remote(args.out):
    paths_lib.check_reachable(args.out, "--out", write=True)
  if args.bundle is None and not bundle_path.is_dir():
    raise FileNotFoundError(f"no --bundle given and this installation has no embedded default model at "
                            f"{bundle_path}; convert one with `python -m unclip_jax.convert`")

  if args.command == "generate":
    distributed.maybe_initialize(args.distributed)
  from unclip_jax import compilation_cache
  from unclip_jax.inference.pipeline import UnCLIP

  compilation_cache.enable(compilation_cache.resolve(args.compilation_cache, compilation_cache.default_dir()))
  pipe = UnCLIP.from_bundle(bundle_path, sampling=sampling_overrides(args), dtype=resolve_dtype(args.dtype),
                            progress=not args.no_progress and args.command != "generate", verify=not args.no_verify,
                            batch_invariant={"auto": None, "on": True, "off": False}[args.batch_invariant])
  base = dict(command=args.command, bundle=str(bundle_path), seed=args.seed, settings=pipe.settings())
  out = paths_lib.as_path(args.out)
  if args.command == "generate":
    return _generate(args, pipe, inputs["prompts"], bundle_path, base)
  if args.command == "variations":
    images = M.variations(pipe, inputs["image"], args.n, eta=args.eta, seed=args.seed, latent=args.latent)
    metas = [dict(base, index=k, image=args.image, eta=args.eta, latent=args.latent) for k in range(len(images))]
  elif args.command == "interpolate":
    images = M.interpolate(pipe, inputs["image"], inputs["image_b"], args.n, latent=args.latent, seed=args.seed)
    metas = [dict(base, index=k, images=[args.image, args.image_b], theta=k / (args.n - 1), latent=args.latent)
             for k in range(len(images))]
  elif args.command == "text-diff":
    images = M.text_diff(pipe, inputs["image"], args.caption, args.target, args.n, max_theta=args.max_theta,
                         seed=args.seed)
    metas = [dict(base, index=k, image=args.image, caption=args.caption, target=args.target,
                  theta=args.max_theta * k / max(args.n - 1, 1)) for k in range(len(images))]
  else:
    images = M.inpaint(pipe, inputs["image"], inputs["mask"], args.prompt, args.n, seed=args.seed)
    metas = [dict(base, index=k, image=args.image, mask=args.mask, prompt=args.prompt) for k in range(len(images))]
  paths = write_outputs(out, images, metas, grid=not args.no_grid)
  print(json.dumps({"written": len(paths), "out": str(out), "size": int(images.shape[1])}))
  return 0


def _bundle_digest(path: pathlib.Path) -> str | None:
  import hashlib

  record = path / "bundle.json"
  return hashlib.sha256(record.read_bytes()).hexdigest() if record.is_file() else None


def _generate(args: argparse.Namespace, pipe, prompts, bundle_path: pathlib.Path, base: dict) -> int:
  """Text to images as a resumable job split over every process (see `inference/job.py`)."""
  import jax

  from unclip_jax import distributed, paths as paths_lib
  from unclip_jax.inference import batch, job as job_lib

  if args.candidates > 1 and not pipe.has_image_encoder:
    raise ValueError("--candidates > 1 reranks with CLIP's image tower, which this bundle's clip component lacks")
  from unclip_jax.inference.pipeline import num_steps

  for cfg in (pipe.prior_cfg, pipe.decoder_cfg, pipe.sr_cfg):   # bad step specs fail before OUT is created
    if cfg is not None:
      num_steps(cfg)
  shard = args.shard_size or (args.batch_size if args.format == "png" else 1000)
  plan = job_lib.Plan(prompts, args.images_per_prompt, args.batch_size, shard)
  out = paths_lib.as_path(args.out)
  bundle_id = bundle_path if paths_lib.is_remote(bundle_path) else bundle_path.resolve()
  record = dict(bundle=str(bundle_id), bundle_json_sha256=_bundle_digest(bundle_path),
                settings=pipe.settings(), seed=args.seed, dtype=str(pipe.dtype), candidates=args.candidates,
                images_per_prompt=args.images_per_prompt, format=args.format, batch_invariant=pipe.batch_invariant,
                prompts_sha256=prompts.digest(), num_prompts=len(prompts.captions))
  # Batch-invariant sampling: the batch size does not change the images, and the job records rows, not batches,
  # so a rerun may use another --batch-size (and, for png, --shard-size); webdataset shards keep their size.
  layout = dict(batch_size=args.batch_size, shard_size=shard)
  record.update(layout if not pipe.batch_invariant else dict(shard_size=shard) if args.format == "webdataset" else {})
  manifest = dict(hash=job_lib.settings_hash(record), record=record, prompts_source=prompts.source,
                  images=len(plan.rows), units=plan.num_units)
  process, count = jax.process_index(), jax.process_count()
  job_lib.check_manifest(out, manifest, write=process == 0)
  distributed.barrier("unclip_sample_manifest")
  job_lib.check_manifest(out, manifest, write=False)

  def sample(captions, prompt_index, k):
    return batch.sample_rows(pipe, captions, prompt_index, k, seed=args.seed, batch_size=args.batch_size,
                             candidates=args.candidates)

  meta = dict(base, candidates=args.candidates, images_per_prompt=args.images_per_prompt)
  job = job_lib.Job(out, plan, sample, meta, fmt=args.format, process=process, process_count=count,
                    devices=int(pipe.mesh.size), barrier=distributed.barrier, progress=not args.no_progress,
                    grid=not args.no_grid)
  rc = job.run()
  if rc == 0 and process == 0:
    summary = json.loads((out / job_lib.SUMMARY).read_text())
    print(json.dumps({"written": summary["images"], "out": str(out), "size": pipe.image_size,
                      "images_per_s": summary["images_per_s"]}))
  return rc


if __name__ == "__main__":
  sys.exit(main())
