"""shapes.py: exact colours, captions agree with labels, holdout pairs absent, determinism, CLI."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from unclip_jax.data import builders, pipeline
from unclip_jax.shapes import data as shapes

HOLDOUT = [("red", "circle"), ("blue", "triangle"), ("green", "square")]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  out = tmp_path_factory.mktemp("shapes")
  path = shapes.build(out, 40, image_size=32, seed=3, holdout="red circle, blue triangle,green square")
  return path, tfds.builder_from_directory(str(path))


def _far_corner(cx, cy, size):
  return (0 if cy > size / 2 else size - 1), (0 if cx > size / 2 else size - 1)


def test_colours_captions_labels(built):
  path, b = built
  src = b.as_data_source("train")
  assert len(src) == 40
  for i in range(len(src)):
    ex = src[i]
    img, (cx, cy, size, angle) = ex["image"], ex["geometry"]
    colour, shape, bg = (shapes.COLOUR_NAMES[ex["colour"]], shapes.SHAPES[ex["shape"]],
                         shapes.COLOUR_NAMES[ex["background"]])
    assert img.shape == (32, 32, 3) and colour != bg
    assert (colour, shape) not in HOLDOUT
    np.testing.assert_array_equal(img[int(cy), int(cx)], shapes.COLOURS[colour])
    np.testing.assert_array_equal(img[_far_corner(cx, cy, 32)], shapes.COLOURS[bg])
    assert 0.3 * 32 <= size <= 0.6 * 32 and abs(angle) <= 15 and (angle == 0) == (shape == "circle")
    assert ex["caption"].decode() in {shapes.caption(colour, shape, bg, t) for t in range(len(shapes.TEMPLATES))}
    # exactly two colours in the image besides antialiased edge pixels
    exact = (img == shapes.COLOURS[colour]).all(-1) | (img == shapes.COLOURS[bg]).all(-1)
    assert exact.mean() > 0.8


def test_metadata_and_features(built):
  _, b = built
  assert b.info.metadata["holdout"] == sorted([list(p) for p in HOLDOUT])
  assert b.info.metadata["colours"]["orange"] == [250, 130, 20]
  assert b.info.features["colour"].names == list(shapes.COLOUR_NAMES)
  assert b.info.features["shape"].names == list(shapes.SHAPES)


def test_pipeline_reads_shapes(built):
  batch = next(pipeline.make_iterator(pipeline.make_dataset(built[0], batch_size=4, seed=0, image_size=32)))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["colour"].dtype == np.int32
  for img, c in zip(batch["image"], batch["background"]):   # no resize at the stored size: exact colours
    corners = [img[0, 0], img[0, -1], img[-1, 0], img[-1, -1]]
    want = np.array(shapes.COLOURS[shapes.COLOUR_NAMES[c]], np.float32) / 127.5 - 1
    assert any(np.allclose(x, want) for x in corners)


def test_shapes_inside_image_and_holdout_over_many_draws():
  holdout = shapes.parse_holdout("red circle,blue triangle")
  counts = np.zeros((len(shapes.COLOURS), len(shapes.SHAPES)), int)
  for i in range(400):
    rng = np.random.default_rng([7, i])
    c, s, b = shapes.sample_labels(rng, holdout)
    counts[c, s] += 1
    assert c != b
    _, (cx, cy, size, angle) = shapes.draw(c, s, b, 64, rng)
    if shapes.SHAPES[s] == "circle":
      assert size / 2 <= cx <= 64 - size / 2 and size / 2 <= cy <= 64 - size / 2
    else:
      pts = shapes.polygon(shapes.SHAPES[s], size, angle) + [cx, cy]
      assert (pts >= 0).all() and (pts <= 64).all()
  assert counts[0, 0] == 0 and counts[2, 2] == 0
  assert (np.delete(counts.ravel(), [0, 2 * 3 + 2]) > 0).all()


def test_deterministic_given_seed():
  a = list(shapes.examples(4, 24, seed=1))
  b = list(shapes.examples(4, 24, seed=1))
  c = list(shapes.examples(4, 24, seed=2))
  for x, y in zip(a, b):
    assert x.caption == y.caption and np.array_equal(np.asarray(x.image), np.asarray(y.image))
  assert any(not np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, c))
  # example i does not depend on n
  assert np.array_equal(np.asarray(list(shapes.examples(2, 24, seed=1))[1].image), np.asarray(a[1].image))


def test_parse_holdout_and_cli(tmp_path, capsys):
  assert shapes.parse_holdout(["blue square", "red circle"]) == [("blue", "square"), ("red", "circle")]
  for bad in ("red", "pink circle", "red hexagon"):
    with pytest.raises(ValueError):
      shapes.parse_holdout(bad)
  assert shapes.main(["--out", str(tmp_path), "--n", "5", "--size", "16", "--holdout", "white square"]) == 0
  b = tfds.builder_from_directory(str(builders.dataset_dir(tmp_path, "image_text", "shapes")))
  assert b.info.splits["train"].num_examples == 5 and b.info.metadata["holdout"] == [["white", "square"]]
  assert shapes.main(["--out", str(tmp_path), "--n", "5", "--holdout", "pink circle"]) == 2
  assert "pink circle" in capsys.readouterr().err
