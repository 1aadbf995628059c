"""eval_shapes.py: the attribute classifier learns real shapes images, metrics on hand-made predictions, classifier
save/load, the prompt list, and an end-to-end CLI run over a random tiny bundle."""
import json
import time

import numpy as np
import pytest

from helpers import build_tiny_bundle
from unclip_jax import bundle, sample
from unclip_jax.shapes import evaluate as E
from unclip_jax.shapes import data as shapes

HOLDOUT = "red circle, blue triangle"
STEPS = 150


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return shapes.build(tmp_path_factory.mktemp("shapes"), 320, image_size=32, seed=5, holdout=HOLDOUT)


@pytest.fixture(scope="module")
def trained(data):
  t0 = time.perf_counter()
  clf = E.train_classifier(data, steps=STEPS, seed=0)
  return clf, time.perf_counter() - t0


def test_classifier_learns_real_images(data, trained):
  clf, seconds = trained
  val = clf.info["val_accuracy"]
  print(f"classifier: {seconds:.1f}s, n_train {clf.info['n_train']}, n_val {clf.info['n_val']}, val {val}")
  assert clf.info["n_val"] == 64 and clf.info["n_train"] == 256
  assert min(val[k] for k in E.HEADS) > 0.9
  # the training data lacks the held-out pairs: the classifier still names them (freshly drawn real images)
  images, labels = E.draw_pairs(shapes.parse_holdout(HOLDOUT), 30, 32)
  held = E.accuracy_per_head(clf.predict(images), labels)
  print(f"held-out pairs: {held}")
  assert min(held[k] for k in E.HEADS) > 0.9
  # any square size: the same images at 64 px are classified alike
  big = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)
  assert (clf.predict(big)["shape"] == clf.predict(images)["shape"]).mean() > 0.9
  assert seconds < 90      # cold compile on a loaded 2-core machine included


def test_training_is_deterministic(data):
  a, b, c = (E.train_classifier(data, steps=3, seed=seed) for seed in (1, 1, 2))   # the fixture's shapes: compiled once
  fa, fb, fc = (bundle.flatten_params(x.params) for x in (a, b, c))
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k])
  assert any(not np.array_equal(fa[k], fc[k]) for k in fa)


def test_get_classifier_trains_once_then_loads(data, tmp_path):
  first, trained = E.get_classifier(data, tmp_path / "clf", steps=3, seed=1)
  assert trained and E.classifier_exists(tmp_path / "clf")
  again, trained = E.get_classifier(data, tmp_path / "clf", steps=3, seed=99)
  assert not trained and again.info["seed"] == 1
  fa, fb = bundle.flatten_params(first.params), bundle.flatten_params(again.params)
  assert all(np.array_equal(fa[k], fb[k]) for k in fa)


def test_adherence_on_hand_made_predictions():
  # prompts: red circle (held out) x2, blue triangle (held out) x1, green square x3
  target = {"colour": [0, 0, 2, 1, 1, 1], "shape": [0, 0, 2, 1, 1, 1], "background": [6, 7, 6, 0, 3, 4]}
  pred = {"colour": [0, 5, 2, 1, 1, 1],        # wrong on 2nd
          "shape": [0, 0, 1, 1, 1, 0],          # wrong on 3rd and 6th
          "background": [6, 7, 6, 0, 2, 4]}     # wrong on 5th
  r = E.adherence(pred, target, [("red", "circle"), ("blue", "triangle")])
  assert r["all"] == {"n": 6, "colour": 5 / 6, "shape": 4 / 6, "background": 5 / 6, "all_three": 2 / 6}
  assert r["heldout"] == {"n": 3, "colour": 2 / 3, "shape": 2 / 3, "background": 1.0, "all_three": 1 / 3}
  assert r["seen"] == {"n": 3, "colour": 1.0, "shape": 2 / 3, "background": 2 / 3, "all_three": 1 / 3}
  assert r["per_pair"]["red circle"]["all_three"] == 0.5 and r["per_pair"]["green square"]["n"] == 3
  assert r["per_pair"]["blue triangle"]["shape"] == 0.0
  empty = E.adherence(pred, target, [])
  assert empty["heldout"]["n"] == 0 and empty["heldout"]["all_three"] is None and empty["seen"] == r["all"]
  with pytest.raises(ValueError, match="same number"):
    E.adherence({**pred, "shape": [0]}, target, [])


def test_pooling_reports_of_several_seeds_equals_adherence_on_all_their_images():
  names = E.HEAD_NAMES
  hold = [("red", "circle")]
  def report(pred, target):
    n = len(target["colour"])
    return {"holdout": [list(p) for p in hold], "per_prompt": [
        {"target": {k: names[k][target[k][i]] for k in E.HEADS}, "pred": {k: names[k][pred[k][i]] for k in E.HEADS}}
        for i in range(n)]}
  t1 = {"colour": [0, 1], "shape": [0, 1], "background": [2, 3]}
  p1 = {"colour": [0, 1], "shape": [1, 1], "background": [2, 3]}      # held-out red circle drawn as a square
  t2 = {"colour": [0, 2], "shape": [0, 2], "background": [4, 5]}
  p2 = {"colour": [0, 2], "shape": [0, 2], "background": [4, 6]}      # seen pair with the wrong background
  pooled = E.pool_adherence([report(p1, t1), report(p2, t2)])
  want = E.adherence({k: p1[k] + p2[k] for k in E.HEADS}, {k: t1[k] + t2[k] for k in E.HEADS}, hold)
  assert pooled == want
  assert pooled["heldout"] == {"n": 2, "colour": 1.0, "shape": 0.5, "background": 1.0, "all_three": 0.5}
  with pytest.raises(ValueError, match="held-out"):
    E.pool_adherence([report(p1, t1), {**report(p2, t2), "holdout": []}])
  assert E.parse_seeds("0, 1,2") == [0, 1, 2]
  for bad in ("", "0,0", "-1", "a"):
    with pytest.raises(ValueError, match="--seeds"):
      E.parse_seeds(bad)


def test_prompts_cover_pairs_and_backgrounds():
  full = E.make_prompts(E.max_prompts())
  assert len(full) == 168 == len({(p.colour, p.shape, p.background) for p in full})
  assert all(p.background != p.colour for p in full)
  assert all(p.text == shapes.caption(*p.pair, shapes.COLOUR_NAMES[p.background], p.template) for p in full)
  assert {p.pair for p in E.make_prompts(24)} == {(c, s) for c in shapes.COLOUR_NAMES for s in shapes.SHAPES}
  assert {p.template for p in E.make_prompts(24)} == {0, 1, 2}
  assert E.make_prompts(30) == full[:30]
  for bad in (0, 169):
    with pytest.raises(ValueError, match="n_prompts"):
      E.make_prompts(bad)


def test_resize_images_checks_input():
  x = E.resize_images(np.full((2, 40, 40, 3), 255, np.uint8), 32)
  assert x.shape == (2, 32, 32, 3) and np.allclose(x, 1.0)
  with pytest.raises(ValueError, match="square"):
    E.resize_images(np.zeros((1, 32, 30, 3), np.uint8), 32)
  with pytest.raises(ValueError, match="uint8"):
    E.resize_images(np.zeros((1, 32, 32, 3), np.float32), 32)


def test_save_load_round_trip(trained, tmp_path):
  clf, _ = trained
  E.save_classifier(clf, tmp_path / "clf")
  assert E.classifier_exists(tmp_path / "clf") and not list((tmp_path / "clf").glob("*.pkl"))
  back = E.load_classifier(tmp_path / "clf")
  assert back.config == clf.config and back.info == json.loads(json.dumps(clf.info))
  images, _ = E.draw_pairs([("green", "square"), ("white", "circle")], 8, 32)
  a, b = clf.logits(images), back.logits(images)
  for k in E.HEADS:
    np.testing.assert_array_equal(a[k], b[k])
  meta = json.loads((tmp_path / "clf" / E.CONFIG_NAME).read_text())
  (tmp_path / "clf" / E.CONFIG_NAME).write_text(json.dumps(dict(meta, config=dict(meta["config"], hidden=8))))
  with pytest.raises(ValueError, match="shape"):
    E.load_classifier(tmp_path / "clf")
  (tmp_path / "clf" / E.CONFIG_NAME).write_text(json.dumps(dict(meta, format="other")))
  with pytest.raises(ValueError, match="not a shapes classifier"):
    E.load_classifier(tmp_path / "clf")
  with pytest.raises(FileNotFoundError):
    E.load_classifier(tmp_path / "missing")


def test_cli_end_to_end_on_tiny_bundle(data, trained, tmp_path, capsys):
  clf, _ = trained
  E.save_classifier(clf, tmp_path / "clf")
  bundle_dir = build_tiny_bundle(tmp_path / "bundle")
  out = tmp_path / "report.json"
  rc = E.main(["--bundle", str(bundle_dir), "--data", str(data), "--classifier", str(tmp_path / "clf"),
               "--n-prompts", "6", "--batch-size", "3", "--seed", "1", "--out", str(out)])
  printed = capsys.readouterr().out
  assert rc == 0, printed
  assert "heldout" in printed and "classifier validation accuracy" in printed
  r = json.loads(out.read_text())
  assert r["n_prompts"] == 6 and len(r["per_prompt"]) == 6 and r["image_size"] == 32
  assert r["holdout"] == [["blue", "triangle"], ["red", "circle"]]
  assert r["classifier"]["trained_now"] is False and r["classifier"]["val_accuracy"] == clf.info["val_accuracy"]
  assert min(r["classifier"]["heldout_pairs_accuracy"][k] for k in E.HEADS) > 0.9
  a = r["adherence"]
  # the first 6 prompts: red circle/square/triangle, green circle/square/triangle; red circle is held out
  assert (a["all"]["n"], a["heldout"]["n"], a["seen"]["n"]) == (6, 1, 5)
  for g in E.GROUPS:
    assert all(0.0 <= a[g][k] <= 1.0 for k in (*E.HEADS, "all_three"))
    assert a[g]["all_three"] <= min(a[g][k] for k in E.HEADS)
  p = r["per_prompt"][0]
  assert p["prompt"] == shapes.caption("red", "circle", p["target"]["background"], 0) and p["heldout"]
  assert p["target"]["colour"] == "red" and p["pred"]["shape"] in shapes.SHAPES
  c = r["clip_score"]
  assert c["available"] and c["real_n"] == 6
  for k in ("generated", "generated_seen", "generated_heldout", "real", "real_mismatched"):
    assert -100.0 <= c[k] <= 100.0
  assert set(r["timing"]) >= {"generate_seconds", "classify_seconds", "clip_seconds", "total_seconds",
                              "classifier_seconds"}


def test_cli_errors(data, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(sample, "DEFAULT_BUNDLE", tmp_path / "no_such_bundle")
  assert E.main(["--data", str(data)]) == 2
  assert "no --bundle given" in capsys.readouterr().err
  assert E.main(["--data", str(tmp_path), "--bundle", str(tmp_path)]) == 2
  assert "no tfds dataset" in capsys.readouterr().err
  assert E.main(["--data", str(data), "--bundle", str(tmp_path), "--holdout", "pink circle"]) == 2
  assert "holdout item" in capsys.readouterr().err
  assert E.main(["--data", str(data), "--bundle", str(tmp_path), "--n-prompts", "0"]) == 2
  assert "--n-prompts" in capsys.readouterr().err
  assert E.main(["--data", str(data), "--bundle", str(tmp_path), "--seeds", "1,1"]) == 2
  assert "--seeds" in capsys.readouterr().err
