"""builders.py / build.py: folder, webdataset and parquet sources, corrupt-image reports, embeddings, CLI."""
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from unclip_jax.data import build, builders


def _image(i, h=12, w=10):
  return np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png(arr):
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG")
  return buf.getvalue()


def _jpeg(arr):
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="JPEG")
  return buf.getvalue()


def _read(path):
  """-> {caption: example} of the train split, via the builder-free reader."""
  src = tfds.builder_from_directory(str(path)).as_data_source("train")
  out = {}
  for i in range(len(src)):
    ex = src[i]
    out[ex["caption"].decode()] = ex
  return out


def _report(path):
  return json.loads((path / builders.REPORT_FILE).read_text())


def test_folder_png_round_trip_and_corrupt_report(tmp_path):
  root = tmp_path / "imgs"
  (root / "sub").mkdir(parents=True)
  for i in range(4):
    (root / "sub" / f"{i}.png").write_bytes(_png(_image(i)))
    (root / "sub" / f"{i}.txt").write_text(f"caption {i}")
  (root / "grey.png").write_bytes(_png(_image(9)[..., 0]))          # L mode -> converted to RGB
  (root / "grey.txt").write_text("caption grey")
  (root / "broken.jpg").write_bytes(_jpeg(_image(5))[:60])          # truncated JPEG
  (root / "broken.txt").write_text("never written")
  (root / "nocap.png").write_bytes(_png(_image(6)))                  # no caption file
  (root / "empty.png").write_bytes(_png(_image(7)))
  (root / "empty.txt").write_text(" \n")                            # empty caption
  rgba = np.concatenate([_image(8, 4, 4), np.zeros((4, 4, 1), np.uint8)], -1)
  (root / "rgba.png").write_bytes(_png(rgba))                        # fully transparent -> white
  (root / "rgba.txt").write_text("caption rgba\n")

  path, report = builders.build_image_text(builders.folder_records(root), tmp_path / "out", "folder",
                                           encoding_format="png")
  assert path == builders.dataset_dir(tmp_path / "out", "image_text", "folder")
  bad = ["broken.jpg", "empty.png", "nocap.png"]
  assert report.written == 6 and sorted(s["key"] for s in report.skipped) == bad
  on_disk = _report(path)
  assert on_disk["written"] == 6 and on_disk["num_skipped"] == 3
  assert sorted(s["key"] for s in on_disk["skipped"]) == bad
  got = _read(path)
  assert sorted(got) == ["caption 0", "caption 1", "caption 2", "caption 3", "caption grey", "caption rgba"]
  assert (got["caption rgba"]["image"] == 255).all()
  for i in range(4):
    np.testing.assert_array_equal(got[f"caption {i}"]["image"], _image(i))   # pixel-exact
  np.testing.assert_array_equal(got["caption grey"]["image"], np.repeat(_image(9)[..., :1], 3, -1))
  with pytest.raises(FileExistsError):
    builders.build_image_text(builders.folder_records(root), tmp_path / "out", "folder", encoding_format="png")


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards(tmp_path):
  shards = tmp_path / "wds"
  shards.mkdir()
  with tarfile.open(shards / "a-000.tar", "w") as tar:
    for i in range(3):
      _add(tar, f"s/{i:04d}.png", _png(_image(i)))
      _add(tar, f"s/{i:04d}.txt", f"wds {i}".encode())
      _add(tar, f"s/{i:04d}.json", b"{}")
    _add(tar, "s/bad.jpg", b"\xff\xd8garbage")
    _add(tar, "s/bad.txt", b"bad")
    _add(tar, "s/lonely.txt", b"no image")
  with tarfile.open(shards / "a-001.tar", "w") as tar:
    _add(tar, "k.tar.png", _png(_image(7)))       # key "k", extension "tar.png" -> not an image member
    _add(tar, "x.jpg", _jpeg(_image(8)))
    _add(tar, "x.txt", b"wds jpeg")
  (shards / "a-002.tar").write_bytes(b"\x00" * 100 + b"not a tar")  # unreadable shard

  path, report = builders.build_image_text(builders.webdataset_records(shards), tmp_path / "out", "wds",
                                           encoding_format="png")
  got = _read(path)
  assert sorted(got) == ["wds 0", "wds 1", "wds 2", "wds jpeg"]
  np.testing.assert_array_equal(got["wds 1"]["image"], _image(1))
  np.testing.assert_array_equal(got["wds jpeg"]["image"], np.asarray(Image.open(io.BytesIO(_jpeg(_image(8))))))
  skipped = {s["key"] for s in _report(path)["skipped"]}
  assert skipped == {"a-000.tar/s/bad", "a-000.tar/s/lonely", "a-001.tar/k", "a-002.tar"}
  assert report.written == 4
  with pytest.raises(FileNotFoundError):
    builders.webdataset_records(tmp_path / "missing-*.tar")


def test_parquet_source_and_resize_on_write(tmp_path):
  images = [_png(_image(i, 40, 20)) for i in range(3)] + [b"corrupt", None]
  captions = ["pq 0", "pq 1", "pq 2", "pq bad", "pq null"]
  pq.write_table(pa.table({"jpg": pa.array(images, pa.binary()), "text": captions}), tmp_path / "t.parquet")

  path, report = builders.build_image_text(builders.parquet_records(tmp_path / "t.parquet"), tmp_path / "out",
                                           "pq", encoding_format="png")
  got = _read(path)
  assert sorted(got) == ["pq 0", "pq 1", "pq 2"]
  np.testing.assert_array_equal(got["pq 2"]["image"], _image(2, 40, 20))
  assert {s["key"] for s in report.skipped} == {"t.parquet:3", "t.parquet:4"}

  path, _ = builders.build_image_text(builders.parquet_records(tmp_path / "t.parquet", "jpg", "text"),
                                      tmp_path / "out", "pq10", encoding_format="jpeg", image_size=10)
  got = _read(path)
  assert {k: v["image"].shape for k, v in got.items()} == {f"pq {i}": (20, 10, 3) for i in range(3)}
  with pytest.raises(ValueError, match="no image column"):
    list(builders.parquet_records(tmp_path / "t.parquet", image_column="nope"))


def test_all_records_bad_is_a_clear_error(tmp_path):
  root = tmp_path / "imgs"
  root.mkdir()
  (root / "a.png").write_bytes(b"junk")
  (root / "a.txt").write_text("a")
  with pytest.raises(ValueError, match="no valid examples"):
    builders.build_image_text(builders.folder_records(root), tmp_path / "out", "bad")
  assert not (tmp_path / "out" / "image_text" / "bad").exists()


def test_embeddings_round_trip_in_order(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {"text_embed": rng.standard_normal((6, 4)).astype(np.float32),
            "text_enc": rng.standard_normal((6, 3, 5)).astype(np.float16),
            "tokens": rng.integers(0, 100, (6, 3)).astype(np.int32)}
  path = builders.build_embeddings(arrays, tmp_path / "out", "clip", captions=[f"c{i}" for i in range(6)],
                                   metadata={"clip": "tiny"})
  b = tfds.builder_from_directory(str(path))
  assert dict(b.info.metadata) == {"clip": "tiny"}
  src = b.as_data_source("train")
  assert len(src) == 6
  for i in range(6):
    ex = src[i]
    assert ex["caption"] == f"c{i}".encode()
    for k, v in arrays.items():
      assert ex[k].dtype == v.dtype
      np.testing.assert_array_equal(ex[k], v[i])
  with pytest.raises(ValueError, match="same leading size"):
    builders.build_embeddings({"a": np.zeros((3, 2)), "b": np.zeros((4, 2))}, tmp_path / "out", "bad")


def test_cli(tmp_path, capsys):
  root = tmp_path / "imgs"
  root.mkdir()
  for i in range(2):
    (root / f"{i}.png").write_bytes(_png(_image(i, 30, 40)))
    (root / f"{i}.txt").write_text(f"cli {i}")
  argv = ["--source", "folder", "--input", str(root), "--out", str(tmp_path / "out"), "--name", "cli",
          "--image-size", "15", "--format", "png"]
  assert build.main(argv) == 0
  got = _read(builders.dataset_dir(tmp_path / "out", "image_text", "cli"))
  assert {k: v["image"].shape for k, v in got.items()} == {"cli 0": (15, 20, 3), "cli 1": (15, 20, 3)}
  assert "wrote 2 examples" in capsys.readouterr().out
  (root / "bad.png").write_bytes(b"junk")
  (root / "bad.txt").write_text("bad")
  assert build.main(argv + ["--name", "cli2"]) == 0
  out = capsys.readouterr().out
  assert "skipped 1" in out and "bad.png: undecodable image" in out
  assert build.main(argv) == 2 and "already exists" in capsys.readouterr().err
  assert build.main(argv + ["--overwrite"]) == 0
  for bad in (["--source", "folder", "--input", str(tmp_path / "nope"), "--out", "o"],
              ["--source", "tfrecord", "--input", str(root), "--out", "o"],
              ["--source", "folder", "--input", str(root), "--out", "o", "--image-size", "0"],
              ["--source", "folder", "--input", str(root)]):
    with pytest.raises(SystemExit) as e:
      build.main(bad)
    assert e.value.code == 2
  assert "does not exist" in capsys.readouterr().err


def test_jpeg_bytes_kept_and_exif_orientation_applied(tmp_path):
  root = tmp_path / "imgs"
  root.mkdir()
  original = _jpeg(_image(1, 12, 10))
  (root / "plain.jpg").write_bytes(original)
  (root / "plain.txt").write_text("plain")
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90° clockwise to display"
  buf = io.BytesIO()
  Image.fromarray(_image(2, 12, 10)).save(buf, format="JPEG", exif=exif)
  (root / "rotated.jpg").write_bytes(buf.getvalue())
  (root / "rotated.txt").write_text("rotated")
  path, _ = builders.build_image_text(builders.folder_records(root), tmp_path / "out", "jpg")
  got = _read(path)
  # unchanged JPEG bytes are stored as they are: decoding gives exactly PIL's decode of the original
  np.testing.assert_array_equal(got["plain"]["image"], np.asarray(Image.open(io.BytesIO(original))))
  assert got["rotated"]["image"].shape == (10, 12, 3)
