"""pipeline.py / global_batch.py: batches, determinism, per-host shards, iterator checkpoints, global arrays."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from unclip_jax.data import builders, global_batch, pipeline

N = 20


def _records():
  for i in range(N):
    h, w = (20, 28) if i % 2 else (24, 18)
    arr = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
    yield builders.Record(f"{i:03d}", _pil(arr), f"caption {i}")


def _pil(arr):
  from PIL import Image
  return Image.fromarray(arr)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  out = tmp_path_factory.mktemp("data")
  images, _ = builders.build_image_text(_records(), out, "tiny", encoding_format="png")
  # Embeddings row j belongs to image-dataset example j (index order of the written dataset).
  src, _ = pipeline.open_source(images)
  ids = np.array([int(src[j]["caption"].split()[1]) for j in range(len(src))], np.int32)
  emb = builders.build_embeddings({"image_embed": np.stack([np.full(4, i, np.float32) for i in ids]),
                                   "example_id": ids}, out, "tiny_emb")
  return images, emb


def _batches(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_batch_shapes_dtypes_ranges(dirs):
  ds = pipeline.make_dataset(dirs[0], batch_size=4, seed=0, image_size=16, max_scale=1.3)
  batch = next(pipeline.make_iterator(ds))
  assert set(batch) == {"image", "caption"}
  assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0 and batch["image"].std() > 0.3
  assert batch["caption"].shape == (4,) and all(c.startswith("caption ") for c in batch["caption"])
  # resolve_dataset_dir finds the dataset from the data_dir root too.
  assert pipeline.resolve_dataset_dir(dirs[0].parents[2] / "image_text" / "tiny") == dirs[0]


def test_crop_is_exact_when_no_resize_is_needed():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
  out = pipeline.random_resize_crop(img, 16, rng)
  left = next(x for x in range(9) if np.array_equal(img[:, x:x + 16], out))
  assert 0 <= left <= 8
  np.testing.assert_allclose(pipeline.to_float(np.array([0, 255], np.uint8)), [-1, 1])


def test_determinism_for_a_seed(dirs):
  make = lambda seed: pipeline.make_iterator(pipeline.make_dataset(dirs[0], batch_size=4, seed=seed,
                                                                   image_size=16, max_scale=1.5))
  a, b, c = _batches(make(1), 6), _batches(make(1), 6), _batches(make(2), 6)
  _assert_same(a, b)
  assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))
  # epoch 2 (batches 5..) is a different permutation of the same 20 examples
  first, second = [np.concatenate([x["caption"] for x in a[s]]) for s in (slice(0, 5), slice(5, 6))]
  assert sorted(first) == sorted(f"caption {i}" for i in range(N))
  assert not np.array_equal(second, first[:4])


def test_per_host_shards_are_disjoint(dirs):
  seen = []
  for p in range(3):
    ds = pipeline.make_dataset(dirs[0], batch_size=1, seed=0, image_size=8, process_index=p, process_count=3,
                               num_epochs=1)
    seen.append({str(b["caption"][0]) for b in pipeline.make_iterator(ds)})
  assert [len(s) for s in seen] == [7, 7, 6]
  assert set.union(*seen) == {f"caption {i}" for i in range(N)} and sum(map(len, seen)) == N
  with pytest.raises(ValueError):
    pipeline.make_dataset(dirs[0], batch_size=1, seed=0, process_index=3, process_count=3)


def test_restored_iterator_continues_exactly(dirs):
  make = lambda: pipeline.make_iterator(
      pipeline.make_dataset(dirs[0], batch_size=3, seed=5, image_size=12, max_scale=1.4), read_threads=2)
  it = make()
  _batches(it, 5)                     # 15 of 20 examples: the continuation crosses the epoch boundary
  state = it.get_state()
  want = _batches(it, 4)
  restored = make()
  restored.set_state(state)
  _assert_same(_batches(restored, 4), want)


def test_zip_with_embeddings(dirs):
  ds = pipeline.make_dataset(list(dirs), batch_size=5, seed=0, image_size=8)
  b = next(pipeline.make_iterator(ds))
  assert set(b) == {"image", "caption", "image_embed", "example_id"}
  assert b["image_embed"].shape == (5, 4) and b["example_id"].dtype == np.int32
  ids = np.array([int(c.split()[1]) for c in b["caption"]])
  np.testing.assert_array_equal(b["example_id"], ids)
  np.testing.assert_array_equal(b["image_embed"][:, 0], ids)
  with pytest.raises(ValueError, match="share feature names"):
    next(pipeline.make_iterator(pipeline.make_dataset([dirs[0], dirs[0]], batch_size=1, seed=0, image_size=8)))


def test_global_batch_on_mesh(dirs):
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"),
                           axis_types=(jax.sharding.AxisType.Auto,) * 2)
  local = next(pipeline.make_iterator(pipeline.make_dataset(dirs, batch_size=8, seed=0, image_size=8)))
  g = global_batch.to_global(local, mesh)
  assert isinstance(g["caption"], np.ndarray) and g["caption"].dtype.kind == "U"
  for k in ("image", "image_embed", "example_id"):
    assert isinstance(g[k], jax.Array) and g[k].shape == local[k].shape
    assert g[k].sharding.spec == P(("data", "fsdp"), *([None] * (local[k].ndim - 1)))
    assert len(g[k].addressable_shards) == 8 and g[k].addressable_shards[0].data.shape[0] == 1
    np.testing.assert_array_equal(np.asarray(g[k]), local[k])


@pytest.mark.slow
def test_mp_prefetch_checkpoint(dirs):
  from absl import flags
  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  ds = pipeline.make_dataset(dirs[0], batch_size=2, seed=0, image_size=8)
  want = _batches(pipeline.make_iterator(ds), 6)
  it = pipeline.make_iterator(ds, workers=2)
  try:
    _assert_same(_batches(it, 3), want[:3])
    state = it.get_state()
  finally:
    it.close()
  it = pipeline.make_iterator(ds, workers=2)
  try:
    it.set_state(state)
    _assert_same(_batches(it, 3), want[3:])
  finally:
    it.close()
