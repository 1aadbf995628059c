"""shapes/pairs.py (two objects): relations hold geometrically, exact colours, captions agree with labels,
held-out object pairs and phrasings absent, determinism, CLI; the text-only decoder ignores the image embedding."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from unclip_jax import config_lib
from unclip_jax.data import builders
from unclip_jax.shapes import data as shapes
from unclip_jax.shapes import pairs


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  out = tmp_path_factory.mktemp("pairs")
  path = pairs.build(out, 60, image_size=64, seed=3, holdout_fraction=0.1, name="train")
  return path, tfds.builder_from_directory(str(path))


def _boxes(geometry, shape_ids):
  """Per object (lo [2], hi [2]) in pixels."""
  out = []
  for (cx, cy, size, angle), s in zip(geometry, shape_ids):
    lo, hi = shapes.extent(shapes.SHAPES[s], size, angle)
    out.append((lo + [cx, cy], hi + [cx, cy]))
  return out


def test_geometry_relation_and_colours_over_many_draws():
  held = set(pairs.choose_holdout(0.1))
  seen_relations = set()
  for i in range(300):
    rng = np.random.default_rng([11, i])
    labels = pairs.sample_labels(rng, held)
    assert labels.colour_a != labels.colour_b and labels.background not in (labels.colour_a, labels.colour_b)
    assert pairs.pair_key((labels.colour_a, labels.shape_a), (labels.colour_b, labels.shape_b)) not in held
    image, geometry = pairs.draw(labels, 64, rng)
    (lo_a, hi_a), (lo_b, hi_b) = _boxes(geometry, (labels.shape_a, labels.shape_b))
    axis, other = labels.relation, 1 - labels.relation
    for lo, hi in ((lo_a, hi_a), (lo_b, hi_b)):
      assert (lo >= -1e-6).all() and (hi <= 64 + 1e-6).all()
    assert lo_b[axis] - hi_a[axis] >= 64 * pairs.MIN_GAP_FRAC - 1e-6        # A strictly left of / above B
    assert lo_b[other] < hi_a[other] and lo_a[other] < hi_b[other]         # and not also above / left of it
    assert all(0.2 * 64 <= g[2] <= 0.4 * 64 for g in geometry)
    img = np.asarray(image)
    for (cx, cy, *_), c in zip(geometry, (labels.colour_a, labels.colour_b)):
      np.testing.assert_array_equal(img[int(cy), int(cx)], shapes.COLOURS[shapes.COLOUR_NAMES[c]])
    seen_relations.add(labels.relation)
  assert seen_relations == {0, 1}


def test_captions_name_both_objects_relation_and_background(built):
  _, b = built
  src = b.as_data_source("train")
  colour, shape = shapes.COLOUR_NAMES, shapes.SHAPES
  for i in range(len(src)):
    ex = src[i]
    labels = pairs.Labels(*(int(ex[k]) for k in pairs.Labels._fields))
    text = ex["caption"].decode()
    assert ex["image"].shape == (64, 64, 3)
    options = {pairs.caption(labels, a_first=a, phrase=p, template=t)
               for a, p in pairs.caption_choices(pairs.HELDOUT_PHRASES) for t in range(len(pairs.TEMPLATES))}
    assert text in options
    assert f"{colour[labels.colour_a]} {shape[labels.shape_a]}" in text
    assert f"{colour[labels.colour_b]} {shape[labels.shape_b]}" in text
    assert colour[labels.background] + " background" in text
    assert not any(p in text for p in pairs.HELDOUT_PHRASES)
  # with A named first the phrase says where A is; B first, where B is
  lab = pairs.Labels(0, 0, 2, 1, 6, 0)
  assert pairs.caption(lab) == "a red circle to the left of a blue square on a white background"
  assert pairs.caption(lab, a_first=False, phrase=1, template=1) == \
      "a blue square right of a red circle, white background"
  assert pairs.caption(lab._replace(relation=1), phrase=2, template=2) == \
      "a white background with a red circle on top of a blue square"


def test_holdout_and_metadata(built):
  path, b = built
  meta = b.info.metadata
  assert meta["objects"] == 2 and meta["holdout_fraction"] == 0.1 and meta["size"] == 64
  held = pairs.parse_pair_names(meta["holdout_pairs"])
  assert held == pairs.choose_holdout(0.1, 0) and len(held) == 26 == int(np.ceil(0.1 * len(pairs.all_pairs())))
  assert len(pairs.all_pairs()) == 252 and meta["heldout_phrases"] == list(pairs.HELDOUT_PHRASES)
  src = b.as_data_source("train")
  for i in range(len(src)):
    ex = src[i]
    assert pairs.pair_key((int(ex["colour_a"]), int(ex["shape_a"])), (int(ex["colour_b"]), int(ex["shape_b"]))) \
        not in set(held)
  assert b.info.features["relation"].names == list(pairs.RELATION_NAMES)
  assert pairs.choose_holdout(0.1, 1) != held and pairs.choose_holdout(0.0) == []
  with pytest.raises(ValueError, match="fraction"):
    pairs.choose_holdout(1.0)
  with pytest.raises(ValueError, match="one colour twice"):
    pairs.parse_pair_names([[["red", "circle"], ["red", "square"]]])
  with pytest.raises(ValueError, match="not"):
    pairs.parse_pair_names([[["pink", "circle"], ["red", "square"]]])


def test_deterministic_and_full_dataset_has_every_phrasing():
  a = list(pairs.examples(6, 32, seed=1))
  b = list(pairs.examples(6, 32, seed=1))
  for x, y in zip(a, b):
    assert x.caption == y.caption and np.array_equal(np.asarray(x.image), np.asarray(y.image))
  assert np.array_equal(np.asarray(list(pairs.examples(2, 32, seed=1))[1].image), np.asarray(a[1].image))
  texts = " ".join(r.caption for r in pairs.examples(300, 32, seed=0))
  assert all(p in texts for p in pairs.HELDOUT_PHRASES)


def test_cli(tmp_path, capsys):
  assert pairs.main(["--out", str(tmp_path), "--n", "4", "--size", "32", "--holdout-fraction", "0.2"]) == 0
  b = tfds.builder_from_directory(str(builders.dataset_dir(tmp_path, "image_text", "pairs")))
  assert b.info.splits["train"].num_examples == 4 and len(b.info.metadata["holdout_pairs"]) == 51
  assert pairs.main(["--out", str(tmp_path / "x"), "--n", "4", "--holdout-fraction", "1.5"]) == 2
  assert "fraction" in capsys.readouterr().err
  assert pairs.main(["--out", str(tmp_path / "y"), "--n", "4", "--size", "16"]) == 2
  assert "at least 32" in capsys.readouterr().err


def test_text_only_decoder_never_sees_the_image_embedding():
  from unclip_jax.stages import decoder as decoder_stage

  b, l = 2, 5
  for conditioning in (True, False):
    cfg = config_lib.load_config("decoder:tiny")
    cfg.image_conditioning = conditioning
    cfg.sampling.steps = "1"
    models = decoder_stage.build(cfg)
    params = decoder_stage.init_params(models, jax.random.key(0))
    # perturb every parameter (the UNet's zero-initialised output conv would hide any dependence)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    e = cfg.model.clip_embedding_dim
    k = jax.random.split(jax.random.key(2), 4)
    batch = {"image": jax.random.uniform(k[0], (b, 16, 16, 3), minval=-1, maxval=1),
             "image_emb": jax.random.normal(k[1], (b, e)), "text_emb": jax.random.normal(k[2], (b, e)),
             "text_enc": jax.random.normal(k[3], (b, l, e)), "text_mask": jnp.ones((b, l), bool)}
    loss = jax.jit(functools.partial(decoder_stage.loss_fn, unet=models.unet, text_proj=models.text_proj,
                                     diffusion=models.diffusion, clip_drop_prob=0.0, text_drop_prob=0.0,
                                     image_conditioning=conditioning))
    losses = [float(loss(params, {**batch, "image_emb": s * batch["image_emb"]}, jax.random.key(3))[0])
              for s in (1.0, -1.0)]
    conds = [decoder_stage.decoder_cond(models.text_proj, params["text_proj"], image_emb=s * batch["image_emb"],
                                        text_emb=batch["text_emb"], text_enc=batch["text_enc"],
                                        text_mask=batch["text_mask"], guidance=True, image_conditioning=conditioning)
             for s in (1.0, -1.0)]
    same_cond = all(np.array_equal(conds[0][key], conds[1][key]) for key in conds[0])
    if conditioning:                                   # the unCLIP decoder uses the embedding ...
      assert losses[0] != losses[1] and not same_cond
    else:                                              # ... the text-only one never does, in training or sampling
      assert losses[0] == losses[1] and same_cond
      sampler = decoder_stage.make_sampler(cfg, models.unet, models.text_proj, models.diffusion)
      x_T = jax.random.normal(jax.random.key(4), (b, 16, 16, 3))
      images = [sampler(params, decoder_stage.DecoderCond(s * batch["image_emb"], batch["text_emb"],
                                                          batch["text_enc"], batch["text_mask"]),
                        x_T, jax.random.key(5)) for s in (1.0, -1.0)]
      np.testing.assert_array_equal(images[0], images[1])
