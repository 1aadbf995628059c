"""Command line: write an image-text array_record dataset from a folder, webdataset tars or parquet.

  python -m unclip_jax.data.build --source folder|webdataset|parquet --input PATH --out DIR
      [--name NAME] [--image-size N] [--format jpeg|png] [--image-column C] [--caption-column C] [--overwrite]

The dataset lands in DIR/image_text/NAME/1.0.0 (read it with `unclip_jax.data.pipeline`); skipped records are
listed in build_report.json there. --image-size downsizes so the shortest side is N (never upsizes).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

from unclip_jax import paths
from unclip_jax.data import builders

SOURCES = ("folder", "webdataset", "parquet")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m unclip_jax.data.build", description=__doc__.split("\n\n")[0])
  p.add_argument("--source", required=True, choices=SOURCES)
  p.add_argument("--input", required=True, help="folder / .tar file, folder of .tar or glob / .parquet file or folder")
  p.add_argument("--out", required=True, help="tfds data_dir to write into")
  p.add_argument("--name", default="default", help="dataset (config) name")
  p.add_argument("--image-size", type=int, default=None, help="downsize shortest side to N on write")
  p.add_argument("--format", default="jpeg", choices=builders.ENCODING_FORMATS, help="stored image encoding")
  p.add_argument("--image-column", default=None, help="parquet only (default: image|jpg|png|img|image_bytes)")
  p.add_argument("--caption-column", default=None, help="parquet only (default: caption|text|txt)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that name")
  args = p.parse_args(argv)
  if args.image_size is not None and args.image_size < 1:
    p.error(f"--image-size must be positive, got {args.image_size}")
  if not pathlib.Path(args.input).exists() and not (args.source != "folder" and any(c in args.input for c in "*?[")):
    p.error(f"--input {args.input} does not exist")
  if args.source == "folder" and not pathlib.Path(args.input).is_dir():
    p.error(f"--source folder needs a directory, got {args.input}")
  if args.source != "parquet" and (args.image_column or args.caption_column):
    p.error("--image-column/--caption-column apply to --source parquet only")
  if paths.is_remote(args.out):                  # fail before reading any input
    try:
      paths.check_reachable(args.out, "--out", write=True)
    except paths.UnreachablePathError as e:
      p.error(str(e))
  return args


def records(args: argparse.Namespace):
  if args.source == "folder":
    return builders.folder_records(args.input)
  if args.source == "webdataset":
    return builders.webdataset_records(args.input)
  return builders.parquet_records(args.input, args.image_column, args.caption_column)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    builders.build_image_text(records(args), args.out, args.name, encoding_format=args.format,
                              image_size=args.image_size, overwrite=args.overwrite)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
