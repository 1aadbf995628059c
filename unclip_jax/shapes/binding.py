"""Attribute binding on two-object shapes (unCLIP paper §7): a judge for generated images and the binding report.

  python -m unclip_jax.shapes.binding --data FULL_DATASET --bundle B [--bundle-text B2] [--judge PATH]
      [--n-prompts 96] [--seeds 0,1,2] [--guidance 1,3,5] [--text-guidance 3,6] [--batch-size 24]
      [--out report.json]

The judge (trained on real images of a `python -m unclip_jax.shapes.pairs` dataset, never on generated ones):
  1. segmentation, no learning: the background is the per-channel median of the border pixels; foreground = pixels
     farther than FG_THRESHOLD from it. The relation is the axis with the widest run of empty columns (horizontal)
     or rows (vertical) between the foreground's ends — the dataset's relations guarantee a gap on exactly one axis.
     The image is split in that gap's middle: object A is the left / top part, B the right / bottom part; no gap on
     either axis means "not two separate objects" (every fact counts as wrong).
  2. each part's foreground bounding box, made square with a margin and filled with the background colour outside
     the part, is resized to a crop that the single-object attribute classifier (`shapes.evaluate`: colour, shape,
     background heads, its shape head colour-blind) reads. It is trained on such crops of real images.
Facts per image: colour and shape of A and of B, the relation, the background (the two crops' background logits
summed). "all right" = all six. A *binding error*: both colours and both shapes appear (as multisets) but paired
the other way (the red circle and blue square drawn as a blue circle and red square, in either place); a *swap*: the
right two objects on the wrong sides.

Prompts (`make_prompts`, fixed by n only): half from the held-out object pairs of the training data (as many as
there are), half from seen pairs; the relation, which object is named first, phrasing (the held-out phrasings
included), caption template and background vary. One image per prompt per seed. Reports per decoder ("unclip": the
bundle; "text": `--bundle-text`, a GLIDE-style text-only decoder), guidance scale, text guidance scale (the remedy
tried: a separate, stronger guidance on the text branch, `sampling.text_guidance_scale`; unCLIP decoder only) and
seed, and pooled over seeds: accuracy per fact, all right, binding-error and swap rates, for all / seen / held-out
prompts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

from unclip_jax.shapes import data as shapes
from unclip_jax.shapes import evaluate as single
from unclip_jax.shapes import pairs

FG_THRESHOLD = 0.25              # distance from the background colour, in [-1, 1] RGB units (palette gaps are > 0.5)
CROP_MARGIN = 0.2                # crop side = (1 + margin) · the part's foreground box side
FACTS = ("colour_a", "shape_a", "colour_b", "shape_b", "relation", "background")
GROUPS = ("all", "seen", "heldout")
JUDGE_CROP_SEED = 0


# ---- segmentation -----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Parts:
  """An image split into its two objects: relation id (0 horizontal, 1 vertical), and crops [2, C, C, 3] uint8
  (A, B) ready for the crop classifier; None relation when the image is not two separate objects."""
  relation: int | None
  crops: np.ndarray | None


def _longest_empty_run(profile: np.ndarray) -> tuple[int, int]:
  """(length, middle index) of the longest run of zeros strictly between the first and last non-zero entries."""
  occupied = np.flatnonzero(profile > 0)
  if len(occupied) < 2:
    return 0, -1
  best, mid, run = 0, -1, 0
  for i in range(occupied[0] + 1, occupied[-1]):
    run = run + 1 if profile[i] == 0 else 0
    if run > best:
      best, mid = run, i - run // 2
  return best, mid


def _crop(image: np.ndarray, mask: np.ndarray, bg: np.ndarray, size: int) -> np.ndarray:
  """The masked object on the background colour, square box with CROP_MARGIN, resized to [size, size, 3] uint8."""
  from PIL import Image

  ys, xs = np.nonzero(mask)
  if len(ys) == 0:
    return np.broadcast_to(bg.astype(np.uint8), (size, size, 3)).copy()
  cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
  side = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) * (1 + CROP_MARGIN) + 2
  h, w = mask.shape
  canvas = np.where(mask[..., None], image, bg.astype(np.uint8))
  y0, x0 = int(np.floor(cy - side / 2)), int(np.floor(cx - side / 2))
  n = int(np.ceil(side))
  out = np.broadcast_to(bg.astype(np.uint8), (n, n, 3)).copy()
  ya, yb, xa, xb = max(0, y0), min(h, y0 + n), max(0, x0), min(w, x0 + n)
  out[ya - y0:yb - y0, xa - x0:xb - x0] = canvas[ya:yb, xa:xb]
  return np.asarray(Image.fromarray(out).resize((size, size), resample=Image.Resampling.BILINEAR))


def split(image: np.ndarray, crop_size: int = 32) -> Parts:
  """uint8 [S, S, 3] -> `Parts` (see the module docstring)."""
  if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] != image.shape[1] or image.dtype != np.uint8:
    raise ValueError(f"image must be uint8 [S, S, 3], got {image.dtype} {image.shape}")
  x = image.astype(np.float32) / 127.5 - 1
  border = np.concatenate([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]])
  bg = np.median(border, axis=0)
  fg = np.sqrt(((x - bg) ** 2).sum(-1)) > FG_THRESHOLD                     # [S, S]
  gaps = [_longest_empty_run(fg.sum(axis=0)), _longest_empty_run(fg.sum(axis=1))]   # (x: columns, y: rows)
  relation = int(np.argmax([g[0] for g in gaps]))
  length, mid = gaps[relation]
  if length == 0:
    return Parts(None, None)
  coords = np.arange(image.shape[0])
  side = (coords[None, :] if relation == 0 else coords[:, None]) < mid                # [S, S] part A
  side = np.broadcast_to(side, fg.shape)
  bg_u8 = np.clip(np.round((bg + 1) * 127.5), 0, 255)
  crops = np.stack([_crop(image, fg & side, bg_u8, crop_size), _crop(image, fg & ~side, bg_u8, crop_size)])
  return Parts(relation, crops)


# ---- the judge --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Judge:
  """The crop classifier plus the segmentation; `info` holds its training data and validation accuracy."""
  classifier: single.Classifier
  info: dict[str, Any] = dataclasses.field(default_factory=dict)

  def judge(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 [N, S, S, 3] -> {fact: int32 [N]} (-1 where the image is not two separate objects)."""
    images = np.asarray(images)
    parts = [split(im, self.classifier.config.input_size) for im in images]
    ok = [p.relation is not None for p in parts]
    out = {k: np.full(len(images), -1, np.int32) for k in FACTS}
    idx = np.flatnonzero(ok)
    if len(idx):
      crops = np.concatenate([parts[i].crops for i in idx])                  # [2M, C, C, 3]: A0, B0, A1, B1, ...
      logits = self.classifier.logits(crops)
      pred = {k: v.reshape(len(idx), 2, -1) for k, v in logits.items()}
      out["colour_a"][idx], out["colour_b"][idx] = pred["colour"][:, 0].argmax(-1), pred["colour"][:, 1].argmax(-1)
      out["shape_a"][idx], out["shape_b"][idx] = pred["shape"][:, 0].argmax(-1), pred["shape"][:, 1].argmax(-1)
      out["background"][idx] = pred["background"].sum(1).argmax(-1)
      out["relation"][idx] = [parts[i].relation for i in idx]
    return out


def real_crops(data_dir, indices: Sequence[int], crop_size: int):
  """Crops of real two-object images by `split`, labelled from the dataset -> (uint8 [2N', C, C, 3], labels
  {colour, shape, background}, number of images `split` could not separate)."""
  images, labels = load_pairs(data_dir, indices)
  crops, lab = [], {k: [] for k in single.HEADS}
  failed = 0
  for i, im in enumerate(images):
    parts = split(im, crop_size)
    if parts.relation is None:
      failed += 1
      continue
    crops.append(parts.crops)
    for obj in "ab":
      lab["colour"].append(labels[f"colour_{obj}"][i])
      lab["shape"].append(labels[f"shape_{obj}"][i])
      lab["background"].append(labels["background"][i])
  return np.concatenate(crops), {k: np.asarray(v, np.int32) for k, v in lab.items()}, failed


def load_pairs(data_dir, indices: Sequence[int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Examples of a two-object dataset -> (uint8 images [N, S, S, 3], {fact: int32 [N]})."""
  from unclip_jax.data import pipeline

  source, features = pipeline.open_source(data_dir)
  missing = [k for k in (*FACTS, "image") if k not in features]
  if missing:
    raise ValueError(f"{data_dir} is not a two-object shapes dataset: it lacks feature(s) {missing} "
                     f"(write one with `python -m unclip_jax.shapes.pairs`)")
  images, labels = [], {k: [] for k in FACTS}
  for i in indices:
    ex = source[int(i)]
    images.append(np.asarray(ex["image"], np.uint8))
    for k in FACTS:
      labels[k].append(int(ex[k]))
  return np.stack(images), {k: np.asarray(v, np.int32) for k, v in labels.items()}


def train_judge(data_dir, *, steps: int = 600, n_train: int = 4000, n_val: int = 1000, seed: int = 0,
                log=None) -> Judge:
  """Fits the crop classifier on `split` crops of the dataset's first n_train images; validates the whole judge
  (segmentation + classifier, all six facts) on its last n_val images."""
  n = single.dataset_size(data_dir)
  train_idx, val_idx = single.split_indices(n, n_train, n_val)
  cfg = single.ClassifierConfig()
  crops, labels, failed = real_crops(data_dir, train_idx, cfg.input_size)
  clf = single.fit_classifier(crops, labels, config=cfg, seed=seed, steps=steps, log=log)
  judge = Judge(clf)
  val_images, val_labels = load_pairs(data_dir, val_idx)
  judge.info = {"data": os.fspath(data_dir), "n_train_images": int(len(train_idx)), "n_val": int(len(val_idx)),
                "train_split_failures": failed, "val_accuracy": fact_accuracy(judge.judge(val_images), val_labels),
                **{f"classifier_{k}": v for k, v in clf.info.items()}}
  return judge


def save_judge(judge: Judge, path) -> pathlib.Path:
  """PATH/ as `save_classifier` writes it, plus PATH/judge.json (training data, validation accuracy)."""
  path = single.save_classifier(judge.classifier, path)
  single.write_report(path / "judge.json", judge.info)
  return path


def load_judge(path) -> Judge:
  path = pathlib.Path(path)
  if not (path / "judge.json").is_file():
    raise FileNotFoundError(f"no judge at {path} (needs judge.json beside the classifier)")
  return Judge(single.load_classifier(path), json.loads((path / "judge.json").read_text(encoding="utf-8")))


# ---- metrics ----------------------------------------------------------------------------------------------------
def fact_accuracy(pred: Mapping[str, np.ndarray], target: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """{"n", each fact, "all_right", "binding_error", "swap"} as fractions (None when n = 0)."""
  n = len(target["colour_a"])
  if n == 0:
    return {"n": 0, **{k: None for k in (*FACTS, "all_right", "binding_error", "swap")}}
  p = {k: np.asarray(pred[k]) for k in FACTS}
  t = {k: np.asarray(target[k]) for k in FACTS}
  ok = {k: p[k] == t[k] for k in FACTS}
  all_right = np.logical_and.reduce([ok[k] for k in FACTS])
  obj = lambda d, o: d[f"colour_{o}"] * 10 + d[f"shape_{o}"]
  same_multiset = lambda a1, a2, b1, b2: ((a1 == b1) & (a2 == b2)) | ((a1 == b2) & (a2 == b1))
  colours = same_multiset(p["colour_a"], p["colour_b"], t["colour_a"], t["colour_b"])
  shapes_ = same_multiset(p["shape_a"], p["shape_b"], t["shape_a"], t["shape_b"])
  objects = same_multiset(obj(p, "a"), obj(p, "b"), obj(t, "a"), obj(t, "b"))
  binding = colours & shapes_ & ~objects
  swap = objects & (obj(p, "a") != obj(t, "a"))
  return {"n": int(n), **{k: float(v.mean()) for k, v in ok.items()}, "all_right": float(all_right.mean()),
          "binding_error": float(binding.mean()), "swap": float(swap.mean())}


def grouped(pred, target, heldout: np.ndarray) -> dict[str, Any]:
  """`fact_accuracy` for all / seen / held-out prompts."""
  return {g: fact_accuracy({k: np.asarray(v)[m] for k, v in pred.items()},
                           {k: np.asarray(v)[m] for k, v in target.items()})
          for g, m in (("all", np.ones_like(heldout)), ("seen", ~heldout), ("heldout", heldout))}


@dataclasses.dataclass(frozen=True)
class Prompt:
  labels: pairs.Labels
  text: str
  heldout: bool


def make_prompts(n: int, holdout: Sequence[pairs.PairKey]) -> list[Prompt]:
  """n prompts (a function of n and the holdout only): min(n // 2, 2·|holdout|) from held-out pairs, the rest
  seen; every relation phrasing (held-out ones included) and template."""
  rng = np.random.default_rng([n, 7])
  held = sorted(holdout)
  seen = [k for k in pairs.all_pairs() if k not in set(held)]
  n_held = min(n // 2, 2 * len(held))
  keys = ([held[i % len(held)] for i in range(n_held)] if held else []) + \
      [seen[i] for i in rng.choice(len(seen), n - n_held, replace=False)]
  choices = pairs.caption_choices()
  out = []
  for j, key in enumerate(keys):
    a, b = key if rng.integers(2) else key[::-1]
    bg = int(rng.choice([c for c in range(len(shapes.COLOURS)) if c not in (a[0], b[0])]))
    labels = pairs.Labels(a[0], a[1], b[0], b[1], bg, int(rng.integers(2)))
    a_first, phrase = choices[int(rng.integers(len(choices)))]
    text = pairs.caption(labels, a_first=a_first, phrase=phrase, template=int(rng.integers(len(pairs.TEMPLATES))))
    out.append(Prompt(labels, text, j < n_held))
  return out


def evaluate(pipe, judge: Judge, prompts: Sequence[Prompt], *, seed: int, batch_size: int) -> dict[str, Any]:
  """One image per prompt with `pipe` (an `UnCLIP`), judged -> {"groups": grouped metrics, "per_prompt": [...]}."""
  t0 = time.perf_counter()
  images = pipe.generate([p.text for p in prompts], seed=seed, batch_size=batch_size).images
  t_gen = time.perf_counter() - t0
  pred = judge.judge(images)
  target = {k: np.array([getattr(p.labels, k) for p in prompts], np.int32) for k in FACTS}
  held = np.array([p.heldout for p in prompts])
  return {"seed": seed, "groups": grouped(pred, target, held), "generate_seconds": round(t_gen, 2),
          "per_prompt": [{"prompt": p.text, "heldout": p.heldout, **{k: int(pred[k][i]) for k in FACTS}}
                         for i, p in enumerate(prompts)]}


def pool(runs: Sequence[Mapping[str, Any]], prompts: Sequence[Prompt]) -> dict[str, Any]:
  """Grouped metrics over every seed's images."""
  pred = {k: np.concatenate([[e[k] for e in r["per_prompt"]] for r in runs]).astype(np.int32) for k in FACTS}
  target = {k: np.tile(np.array([getattr(p.labels, k) for p in prompts], np.int32), len(runs)) for k in FACTS}
  return grouped(pred, target, np.tile(np.array([p.heldout for p in prompts]), len(runs)))


def format_rows(report: Mapping[str, Any]) -> str:
  f = lambda x: "-" if x is None else f"{x:.3f}"
  lines = [f"{'decoder':<8}{'guid.':>6}{'text':>6}{'group':>9}{'n':>6}{'all right':>11}{'binding':>9}{'swap':>7}"
           f"{'relation':>10}{'backgr.':>9}"]
  for row in report["rows"]:
    for g in GROUPS:
      m = row["pooled"][g]
      text = "-" if row["text_guidance"] is None else f"{row['text_guidance']:g}"
      lines.append(f"{row['decoder']:<8}{row['guidance']:>6g}{text:>6}{g:>9}{m['n']:>6}{f(m['all_right']):>11}"
                   f"{f(m['binding_error']):>9}{f(m['swap']):>7}{f(m['relation']):>10}{f(m['background']):>9}")
  return "\n".join(lines)


# ---- CLI --------------------------------------------------------------------------------------------------------
def parse_floats(text: str, name: str) -> list[float]:
  try:
    vals = [float(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"{name} must be comma-separated numbers, got {text!r}") from None
  if not vals:
    raise ValueError(f"{name} is empty")
  return vals


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m unclip_jax.shapes.binding", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--data", required=True, help="two-object dataset the judge trains on (the 'full' one)")
  p.add_argument("--train-data", default=None, help="the decoders' training dataset (its held-out pairs define "
                                                     "the held-out prompts; default --data's metadata)")
  p.add_argument("--bundle", default=None, help="unCLIP bundle (CLIP image embedding + text decoder)")
  p.add_argument("--bundle-text", default=None, help="bundle with the text-only decoder")
  p.add_argument("--judge", default=None, help="judge folder; trained and saved there if missing")
  p.add_argument("--judge-steps", type=int, default=600)
  p.add_argument("--n-prompts", type=int, default=96)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--guidance", default=None, help='decoder guidance scales, e.g. "1,3,5" (default: the bundle\'s)')
  p.add_argument("--text-guidance", default=None, help='text guidance scales for the unCLIP decoder, e.g. "3,6" '
                                                       "(rows added to the plain-guidance ones)")
  p.add_argument("--batch-size", type=int, default=24)
  p.add_argument("--out", default=None, help="write the JSON report here")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  return single.run_cli(parser, _run, argv)


def _run(args) -> int:
  seeds = single.parse_seeds(args.seeds)
  guidance = None if args.guidance is None else parse_floats(args.guidance, "--guidance")
  text_guidance = [] if args.text_guidance is None else parse_floats(args.text_guidance, "--text-guidance")
  if args.n_prompts < 2:
    raise ValueError(f"--n-prompts must be >= 2, got {args.n_prompts}")
  bundles = {k: v for k, v in (("unclip", args.bundle), ("text", args.bundle_text)) if v}
  for name, path in bundles.items():
    if not pathlib.Path(path, "bundle.json").is_file():
      raise FileNotFoundError(f"--{'bundle' if name == 'unclip' else 'bundle-text'} {path}: no bundle.json there")
  meta = single.dataset_metadata(args.train_data or args.data)
  holdout = pairs.parse_pair_names(meta.get("holdout_pairs", []))
  t0 = time.perf_counter()
  if args.judge and (pathlib.Path(args.judge) / "judge.json").is_file():
    judge = load_judge(args.judge)
  else:
    judge = train_judge(args.data, steps=args.judge_steps, log=lambda m: print(m, file=sys.stderr))
    if args.judge:
      save_judge(judge, args.judge)
  print(f"judge validation (real images): {json.dumps(judge.info['val_accuracy'])}", file=sys.stderr)
  report: dict[str, Any] = {"judge": judge.info, "judge_seconds": round(time.perf_counter() - t0, 2),
                            "holdout_pairs": [pairs.pair_names(k) for k in holdout], "seeds": seeds, "rows": []}
  prompts = make_prompts(args.n_prompts, holdout)
  if bundles:
    from unclip_jax.inference.pipeline import UnCLIP

    for name, path in bundles.items():
      base = UnCLIP.from_bundle(path)
      for g in guidance or [None]:
        for tg in [None] + (text_guidance if name == "unclip" else []):
          overrides = {k: v for k, v in (("guidance_scale", g), ("text_guidance_scale", tg)) if v is not None}
          pipe = base.with_sampling(decoder=overrides) if overrides else base
          runs = [evaluate(pipe, judge, prompts, seed=s, batch_size=args.batch_size) for s in seeds]
          settings = pipe.settings()["decoder"]
          report["rows"].append({"decoder": name, "bundle": str(path), "guidance": float(settings["guidance_scale"]),
                                 "text_guidance": settings["text_guidance_scale"], "pooled": pool(runs, prompts),
                                 "runs": runs})
    print(format_rows(report))
  if args.out:
    single.write_report(args.out, report)
  return 0


if __name__ == "__main__":
  sys.exit(main())
