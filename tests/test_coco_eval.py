"""`python -m unclip_jax.eval coco` (#20): the MS-COCO protocol end to end on a COCO look-alike of the shapes data.

The "val2014" images are shapes images (tests/helpers.write_coco_like: COCO_val2014_<id>.jpg, non-square, two
captions each in a COCO captions file). The metrics use the embedded bundle's CLIP (`--features clip`: CLIP-FD; no
Inception weights exist offline). The default test samples with a tiny random bundle (the plumbing: ids, cache,
commands, resume); the slow ones with the embedded default model (its numbers) and the Inception path on a
random-weight checkpoint built like tests/test_fid.py's.
"""
from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil

import numpy as np
import pytest

from helpers import build_tiny_bundle, synthetic_inception_state_dict, write_coco_like
from unclip_jax.eval import coco, fid as fid_lib
from unclip_jax.eval.__main__ import main as eval_main
from unclip_jax.inference import prompt_sets

N_IMAGES, N = 10, 6
FAST = ["--batch-size", "6", "--prior-steps", "5", "--decoder-steps", "5", "--no-progress", "--eval-batch-size", "8"]


def _coco(data, out, *extra):
  return eval_main(["coco", "--captions", data["captions"], "--images", data["images"], "--n", str(N), "--seed",
                    "0", "--out", str(out), *FAST, *extra])


def _report(out) -> dict:
  return json.loads((pathlib.Path(out) / "report.json").read_text())


def _sample_mtimes(out) -> dict[str, int]:
  return {p.name: p.stat().st_mtime_ns for p in sorted((pathlib.Path(out) / "samples").glob("*.png"))}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return write_coco_like(tmp_path_factory.mktemp("coco"), N_IMAGES)


def _run(data, out, *extra):
  with pytest.warns(UserWarning, match="strongly biased"):
    assert _coco(data, out, "--features", "clip", "--fd-method", "eigh", *extra) == 0
  return out


@pytest.fixture(scope="module")
def tiny_run(data, tmp_path_factory):
  bundle = build_tiny_bundle(tmp_path_factory.mktemp("bundle"), super_res=False)
  return _run(data, tmp_path_factory.mktemp("tiny") / "coco", "--bundle", str(bundle)), ["--bundle", str(bundle)]


@pytest.fixture(scope="module")
def embedded_run(data, tmp_path_factory):
  return _run(data, tmp_path_factory.mktemp("embedded") / "coco", "--sr-steps", "3")


def _real_vs_real(data, stats, ids, folder, capsys) -> float:
  """FID of the cached reference statistics against the squares the chosen images were drawn as."""
  index = {image_id: k for k, image_id in enumerate(data["ids"])}
  folder.mkdir()
  for image_id in ids:
    shutil.copy(pathlib.Path(data["squares"]) / f"{index[image_id]:04d}.png", folder / f"{image_id}.png")
  capsys.readouterr()
  assert eval_main(["fid", "--features", "clip", "--fd-method", "eigh", "--real", stats, "--fake", str(folder)]) == 0
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fid"]


@pytest.mark.filterwarnings("ignore:only")
def test_coco_end_to_end_and_resume(data, tiny_run, tmp_path, capsys):
  out, bundle = tiny_run
  r = _report(out)
  # the ids and captions are the sample CLI's --coco-captions choice
  chosen = prompt_sets.read_coco(data["captions"], N, 0)
  manifest = json.loads((out / "samples" / "manifest.json").read_text())
  assert manifest["prompts_source"]["image_ids"] == chosen.source["image_ids"]
  sidecars = [json.loads((out / "samples" / f"{k:04d}.json").read_text())["prompt"] for k in range(N)]
  assert sidecars == chosen.captions and not (out / "samples" / "grid.png").exists()
  # the report
  assert r["metric"] == "coco" and (r["n"], r["seed"]) == (N, 0)
  assert r["features"] == "clip-image-embeds" and r["protocol"] == "clean" and r["clip"] == "embedded"
  assert r["reference"]["mode"] == "ids" and r["reference"]["n"] == N and r["reference"]["size"] == 16
  assert r["reference"]["cached"] is False and os.path.isfile(r["reference"]["stats"])
  assert np.isfinite(r["fid"]) and r["fid"] > 0 and 0 <= r["clip_score"] <= 100 and r["clip_score_real"] > 80
  assert r["settings"]["seed"] == 0 and r["settings"]["settings"]["decoder"]["steps"] == "5"
  assert r["settings"]["bundle"] == str(pathlib.Path(bundle[1]).resolve())
  assert r["sampling"]["images"] == N and r["sampling"]["images_this_run"] == N
  assert set(r["timings"]) == {"sampling_s", "reference_stats_s", "fid_s", "clip_score_s", "total_s"}
  assert all(v >= 0 for v in r["timings"].values()) and r["timings"]["sampling_s"] > 0
  assert len((out / "clip_scores.jsonl").read_text().splitlines()) == N

  # the documented commands reproduce the numbers (fid on the cached statistics, clip-score on the samples)
  sample_cmd, fid_cmd, clip_cmd = r["commands"]
  assert sample_cmd.startswith("python -m unclip_jax.sample generate --coco-captions ")
  capsys.readouterr()
  assert eval_main(shlex.split(fid_cmd)[3:]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fid"] == pytest.approx(r["fid"], rel=1e-9)
  assert eval_main(shlex.split(clip_cmd)[3:]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["clip_score"] == pytest.approx(
      r["clip_score"], rel=1e-6)

  # real vs real: the cached statistics are those of the chosen images' centre crops (the squares they were drawn
  # as, here downsized to the samples' 16², up to JPEG rounding): far below the samples' distance
  real_vs_real = _real_vs_real(data, r["reference"]["stats"], chosen.source["image_ids"], tmp_path / "same", capsys)
  print(f"tiny bundle, n={N}: CLIP-FD {r['fid']:.4f}, real vs real {real_vs_real:.2e}")
  assert abs(real_vs_real) < 0.05 * r["fid"]

  # a rerun resumes: nothing resampled, the reference statistics and real CLIP score come from OUT
  before = _sample_mtimes(out)
  assert _coco(data, out, "--features", "clip", "--fd-method", "eigh", *bundle) == 0
  again = _report(out)
  assert _sample_mtimes(out) == before and again["sampling"]["images_this_run"] == 0
  assert again["reference"]["cached"] is True and again["reference"]["stats"] == r["reference"]["stats"]
  assert again["fid"] == pytest.approx(r["fid"], rel=1e-9) and again["clip_score"] == pytest.approx(r["clip_score"])
  assert again["clip_score_real"] == pytest.approx(r["clip_score_real"])

  # --reference all: every image of the folder, new statistics beside the first ones; still no resampling
  assert _coco(data, out, "--features", "clip", "--fd-method", "eigh", "--reference", "all", *bundle) == 0
  full = _report(out)
  assert full["reference"]["n"] == N_IMAGES and full["reference"]["stats"] != r["reference"]["stats"]
  assert full["clip_score_real"] is None and full["sampling"]["images_this_run"] == 0
  assert np.isfinite(full["fid"]) and fid_lib.FIDStats.load(full["reference"]["stats"]).n == N_IMAGES
  assert len(list(out.glob("real_stats-*.npz"))) == 2 and _sample_mtimes(out) == before

  # other sampling settings into the same OUT are refused by the sample CLI (nothing overwritten)
  capsys.readouterr()
  assert eval_main(["coco", "--captions", data["captions"], "--images", data["images"], "--n", str(N), "--out",
                    str(out), "--features", "clip", *FAST, *bundle, "--seed", "1"]) == 2
  assert "other settings" in capsys.readouterr().err and _sample_mtimes(out) == before


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:only")
def test_coco_embedded_model(data, embedded_run, tmp_path, capsys):
  """The embedded default model on the shapes "COCO": its samples are near the real images, the real ones nearer."""
  r = _report(embedded_run)
  assert r["settings"]["bundle"].endswith("default_bundle") and r["reference"]["size"] == 64
  chosen = prompt_sets.read_coco(data["captions"], N, 0)
  real_vs_real = _real_vs_real(data, r["reference"]["stats"], chosen.source["image_ids"], tmp_path / "same", capsys)
  print(f"embedded model, n={N}: CLIP-FD {r['fid']:.4f} (real vs real {real_vs_real:.2e}), CLIP score "
        f"{r['clip_score']:.2f} (real {r['clip_score_real']:.2f}); timings {r['timings']}")
  assert 70 < r["clip_score"] <= 100 and r["clip_score_real"] > 90
  assert np.isfinite(r["fid"]) and abs(real_vs_real) < 0.05 * r["fid"]


def test_coco_errors_before_any_compute(tmp_path, capsys, monkeypatch):
  data = write_coco_like(tmp_path / "d", 4)
  out = tmp_path / "out"
  base = ["coco", "--captions", data["captions"], "--images", data["images"], "--n", "4", "--out", str(out),
          "--features", "clip"]

  def err(*argv):
    code = eval_main(list(argv))
    text = capsys.readouterr().err
    assert code == 2, text
    assert not (out / "samples").exists()
    return text

  missing = str(tmp_path / "nope.json")
  assert "COCO captions file not found" in err(*base[:2], missing, *base[3:])
  (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
  assert "not a COCO captions file" in err(*base[:2], str(tmp_path / "bad.json"), *base[3:])
  assert "--images: path not found" in err(*base[:4], str(tmp_path / "no_images"), *base[5:])
  assert "--n must be in 1..4" in err(*base[:6], "5", *base[7:])
  assert "--n must be >= 2" in err(*base[:6], "1", *base[7:])
  assert "--clip" in err(*base, "--clip", str(tmp_path))
  assert "use --protocol clean" in err(*base, "--protocol", "pytorch-fid")
  assert "--fid-clip is the CLIP of --features clip" in err(*base[:-2], "--fid-clip", str(tmp_path))
  monkeypatch.delenv("UNCLIP_JAX_INCEPTION_WEIGHTS", raising=False)
  assert "--inception-weights is required" in err(*base[:-2])
  assert "not found" in err(*base[:-2], "--inception-weights", str(tmp_path / "pt_inception.pth"))
  # an id of the captions without its image file is named, with the file looked for
  os.remove(os.path.join(data["images"], "COCO_val2014_000000000049.jpg"))
  text = err(*base)
  assert "1 of the 4 chosen image ids have no image file" in text and "49 (COCO_val2014_000000000049.jpg)" in text


def test_reference_files_without_an_images_table(tmp_path):
  """Captions files without "images": COCO_val2014_<id>.jpg, then 2017-style <id>.jpg, searched recursively."""
  (tmp_path / "a").mkdir()
  for name in ("a/COCO_val2014_000000000007.jpg", "000000000009.jpg", "notes.txt"):
    (tmp_path / name).write_bytes(b"x")
  files = coco.reference_files([9, 7], tmp_path, {})
  assert files == [str(tmp_path / "000000000009.jpg"), str(tmp_path / "a" / "COCO_val2014_000000000007.jpg")]
  with pytest.raises(coco.CocoError, match=r"1 of the 3 .* 11 \(COCO_val2014_000000000011.jpg\)"):
    coco.reference_files([7, 9, 11], tmp_path, {})
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "000000000009.jpg").write_bytes(b"x")
  with pytest.raises(coco.CocoError, match="more than one subfolder"):
    coco.reference_files([9], tmp_path, {})
  image = np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3)
  np.testing.assert_array_equal(coco.square_resize(image, 40), image[:, 10:50])
  assert coco.square_resize(image, 20).shape == (20, 20, 3)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:only")
def test_coco_inception_path(data, embedded_run, tmp_path):
  """--features inception with a random-weight pytorch-fid checkpoint, into the embedded run's OUT (no
  resampling)."""
  torch = pytest.importorskip("torch")
  out = embedded_run
  weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  torch.save(synthetic_inception_state_dict(), weights)
  before = _sample_mtimes(out)
  assert _coco(data, out, "--sr-steps", "3", "--inception-weights", str(weights), "--fd-method", "eigh",
               "--protocol", "pytorch-fid") == 0
  r = _report(out)
  assert r["features"] == "inception-v3-pool3" and r["protocol"] == "pytorch-fid"
  assert r["sampling"]["images_this_run"] == 0 and _sample_mtimes(out) == before
  assert np.isfinite(r["fid"]) and r["fid"] > 0 and len(r["reference"]["fingerprint"]) == 16
  stats = fid_lib.FIDStats.load(r["reference"]["stats"])
  assert stats.mu.shape == (2048,) and stats.protocol == "pytorch-fid" and stats.fingerprint == \
      r["reference"]["fingerprint"]
  assert "--inception-weights" in r["commands"][1]
  print(f"coco inception path (random weights, n={N}): FID {r['fid']:.4g}; timings {r['timings']}")
