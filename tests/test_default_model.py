"""The embedded default model: the sample CLI with no --bundle writes 0000.png... at 64² and the images show what the
prompts say, judged by a classifier trained here on real dataset images (issue #8's acceptance check)."""
import pathlib
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from unclip_jax import sample
from unclip_jax.shapes import evaluate as E
from unclip_jax.shapes import data as shapes

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "launch" / "shapes_prompts.txt"


def _cli(*args, cwd):
  proc = subprocess.run([sys.executable, "-m", "unclip_jax.sample", *args], cwd=cwd, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_bundle_is_embedded_and_small():
  assert sample.DEFAULT_BUNDLE.is_dir(), "the embedded default bundle is missing from the package"
  size = sum(f.stat().st_size for f in sample.DEFAULT_BUNDLE.rglob("*") if f.is_file())
  assert size <= 25 * 2**20, f"embedded bundle is {size / 2**20:.1f} MB (limit 25 MB)"
  from unclip_jax import bundle
  assert set(bundle.list_components(sample.DEFAULT_BUNDLE)) >= {"clip", "prior", "decoder", "super_res_first"}
  assert (ROOT / "MODEL_CARD.md").is_file()


def test_prompts_file_is_the_evaluation_set():
  lines = [l for l in PROMPTS.read_text().splitlines() if l.strip()]
  assert lines == [p.text for p in E.make_prompts(24)]


@pytest.mark.slow
def test_sample_cli_uses_embedded_model_and_follows_prompts(tmp_path):
  out = tmp_path / "out"
  # no --bundle: the embedded default; run from another directory so nothing depends on the checkout's cwd
  _cli("--prompts-file", str(PROMPTS), "--out", str(out), "--seed", "0", "--no-progress", cwd=tmp_path)
  pngs = sorted(p.name for p in out.glob("[0-9][0-9][0-9][0-9].png"))
  assert pngs == [f"{i:04d}.png" for i in range(24)]
  images = np.stack([np.asarray(PIL.Image.open(out / n).convert("RGB")) for n in pngs])
  assert images.shape == (24, 64, 64, 3)

  data = shapes.build(tmp_path / "data", 7000, image_size=64, seed=11)
  clf = E.train_classifier(data, seed=0)
  assert min(clf.info["val_accuracy"][k] for k in E.HEADS) >= 0.98
  prompts = E.make_prompts(24)
  target = {k: np.array([getattr(p, k) for p in prompts], np.int32) for k in E.HEADS}
  holdout = shapes.parse_holdout("red triangle,green circle,blue square,purple triangle")   # train_shapes.sh's
  report = E.adherence(clf.predict(images), target, holdout)
  print(report["all"], report["heldout"])
  assert report["heldout"]["n"] == 4
  # measured 24/24 with all three right; 22/24 leaves room for a classifier trained on other images
  assert report["all"]["all_three"] >= 22 / 24, report
  assert report["all"]["colour"] >= 0.95 and report["all"]["background"] >= 0.95, report
  assert report["heldout"]["all_three"] >= 0.75, report          # zero-shot pairs: measured 4 of 4

  one = tmp_path / "one"
  _cli("--prompt", "a yellow square on a blue background", "--out", str(one), "--seed", "1", "--no-progress",
       cwd=tmp_path)
  img = np.asarray(PIL.Image.open(one / "0000.png").convert("RGB"))
  assert img.shape == (64, 64, 3)
  pred = clf.predict(img[None])
  assert (shapes.COLOUR_NAMES[pred["colour"][0]], shapes.SHAPES[pred["shape"][0]],
          shapes.COLOUR_NAMES[pred["background"][0]]) == ("yellow", "square", "blue")
