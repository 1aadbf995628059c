"""shapes/binding.py: the two-object judge (segmentation, crop classifier), binding metrics, prompts, CLI."""
import json

import numpy as np
import pytest

from unclip_jax.shapes import binding, pairs
from unclip_jax.shapes import data as shapes


@pytest.fixture(scope="module")
def full(tmp_path_factory):
  return pairs.build(tmp_path_factory.mktemp("pairs"), 400, image_size=64, seed=0, name="full")


def _draw(labels, seed=0, size=64):
  return np.asarray(pairs.draw(labels, size, np.random.default_rng(seed))[0])


def test_split_finds_the_relation_and_the_objects_in_order():
  for i in range(40):
    rng = np.random.default_rng([5, i])
    labels = pairs.sample_labels(rng, set())
    image = np.asarray(pairs.draw(labels, 64, rng)[0])
    parts = binding.split(image, 32)
    assert parts.relation == labels.relation and parts.crops.shape == (2, 32, 32, 3)
    for crop, c in zip(parts.crops, (labels.colour_a, labels.colour_b)):     # A's crop holds A's colour
      rgb = np.array(shapes.COLOURS[shapes.COLOUR_NAMES[c]])
      assert (np.abs(crop.astype(int) - rgb).sum(-1) < 30).mean() > 0.08
  one = np.asarray(shapes.draw(0, 0, 6, 64, np.random.default_rng(0))[0])     # a single object: no gap
  assert binding.split(one).relation is None
  blank = np.full((64, 64, 3), 200, np.uint8)
  assert binding.split(blank).relation is None
  with pytest.raises(ValueError, match="uint8"):
    binding.split(np.zeros((64, 32, 3), np.uint8))


def test_fact_accuracy_binding_and_swap():
  t = pairs.Labels(0, 0, 2, 1, 6, 0)           # red circle | blue square, horizontal, white
  target = {k: np.array([getattr(t, k)] * 5) for k in binding.FACTS}
  rows = [t,                                    # right
          t._replace(shape_a=1, shape_b=0),     # red square | blue circle: binding error
          t._replace(colour_a=2, colour_b=0),   # blue circle | red square: binding error
          t._replace(colour_a=2, shape_a=1, colour_b=0, shape_b=0),   # blue square | red circle: swap
          t._replace(colour_a=3)]               # yellow circle: plain colour error
  pred = {k: np.array([getattr(r, k) for r in rows]) for k in binding.FACTS}
  m = binding.fact_accuracy(pred, target)
  assert m["n"] == 5 and m["all_right"] == 0.2 and m["binding_error"] == 0.4 and m["swap"] == 0.2
  assert m["relation"] == 1.0 and m["colour_a"] == 0.4
  failed = {k: np.full(5, -1) for k in binding.FACTS}                         # not two objects: all wrong
  assert binding.fact_accuracy(failed, target)["all_right"] == 0.0
  assert binding.fact_accuracy({k: v[:0] for k, v in pred.items()}, {k: v[:0] for k, v in target.items()})["n"] == 0


def test_prompts_fixed_by_n_and_half_held_out():
  held = pairs.choose_holdout(0.1)
  p = binding.make_prompts(40, held)
  assert [x.text for x in p] == [x.text for x in binding.make_prompts(40, held)]
  assert sum(x.heldout for x in p) == 20 and len({x.text for x in p}) == 40
  for x in p:
    key = pairs.pair_key((x.labels.colour_a, x.labels.shape_a), (x.labels.colour_b, x.labels.shape_b))
    assert (key in set(held)) == x.heldout
    assert shapes.COLOUR_NAMES[x.labels.background] + " background" in x.text
  assert sum(x.heldout for x in binding.make_prompts(40, [])) == 0


def test_judge_reads_real_images(full, tmp_path):
  judge = binding.train_judge(full, steps=300, n_train=300, n_val=100)
  acc = judge.info["val_accuracy"]
  assert acc["n"] == 80 and acc["relation"] == 1.0 and acc["all_right"] >= 0.9, acc
  binding.save_judge(judge, tmp_path / "judge")
  again = binding.load_judge(tmp_path / "judge")
  images, labels = binding.load_pairs(full, range(320, 400))
  assert all(np.array_equal(a, b) for a, b in zip(judge.judge(images).values(), again.judge(images).values()))
  with pytest.raises(FileNotFoundError, match="no judge"):
    binding.load_judge(tmp_path)


@pytest.mark.slow
def test_cli_with_the_embedded_single_object_model(full, tmp_path, capsys):
  """The CLI end to end: the single-object default model never draws two objects, so nothing is right."""
  out = tmp_path / "report.json"
  assert binding.main(["--data", str(full), "--bundle", str(_default_bundle()), "--n-prompts", "4", "--seeds", "0",
                       "--guidance", "1,3", "--text-guidance", "5", "--batch-size", "4", "--judge-steps", "50", "--judge", str(tmp_path / "j"),
                       "--out", str(out)]) == 0
  report = json.loads(out.read_text())
  assert [(r["guidance"], r["text_guidance"]) for r in report["rows"]] == [(1.0, None), (1.0, 5.0), (3.0, None),
                                                                          (3.0, 5.0)]
  assert report["rows"][0]["pooled"]["all"]["n"] == 4 and report["rows"][0]["pooled"]["all"]["all_right"] == 0.0
  assert "binding" in capsys.readouterr().out
  assert binding.main(["--data", str(full), "--bundle", str(tmp_path / "nope")]) == 2
  assert "bundle.json" in capsys.readouterr().err


def _default_bundle():
  from unclip_jax import sample
  return sample.DEFAULT_BUNDLE


def test_shapes2_prompts_file_is_the_binding_prompt_set():
  """launch/shapes2_prompts.txt (the docs' grids) = make_prompts(16) with train_shapes2.sh's held-out pairs."""
  import pathlib

  path = pathlib.Path(__file__).resolve().parents[1] / "launch" / "shapes2_prompts.txt"
  want = [p.text for p in binding.make_prompts(16, pairs.choose_holdout(0.1, 0))]
  assert [l for l in path.read_text().splitlines() if l.strip()] == want
