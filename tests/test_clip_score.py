"""CLIP score and CLIP-FD (#20): parity with transformers' CLIPModel and torchmetrics' `clip_score`, the inputs
(sidecar JSON, webdataset shards, captions files), the CLI, and an end-to-end run on the shapes data.

References:
  - transformers `CLIPModel.get_image_features` / `get_text_features` on a tiny random CLIP saved with
    `save_pretrained` (plus a `CLIPImageProcessor` whose resize 40 differs from its crop 32), which the scorer loads
    through `convert.clip.load_hf_clip`: per-pair 100·cos within 1e-4.
  - torchmetrics 1.9 `functional.multimodal.clip_score` with that model and a `CLIPProcessor` (installed with
    `pip install --no-deps torchmetrics lightning-utilities`; skipped without it). Its package `__init__` imports
    torch-fidelity when installed, whose `__init__` imports torchvision (which does not import beside the pinned CPU
    torch), so the test imports torchmetrics with torch-fidelity hidden; and it expects `get_*_features` to return
    tensors, which transformers 5 wraps in an output object, so the model is passed through a small adapter.
    torchmetrics clamps the *mean*
    (max(mean 100·cos, 0)); we report that as `clip_score_torchmetrics` next to the mean of per-pair clamps.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from unclip_jax.eval import __main__ as cli
from unclip_jax.eval import clip_score as cs

TOL = 1e-4
PROMPTS = ["a red circle on a white background", "a blue square", "green triangle, black background",
           "an orange circle on a purple background", "a yellow square on a blue background"]
LONG = "a very long prompt " * 10  # > 16 tokens: truncated to the tiny CLIP's context length


def _images(n=5, seed=0):
  rng = np.random.default_rng(seed)
  shapes = [(48, 40), (32, 32), (64, 50), (40, 72), (33, 47), (50, 50)]
  return [rng.integers(0, 256, shapes[i % len(shapes)] + (3,), dtype=np.uint8) for i in range(n)]


def _hf_tokenizer():
  import transformers

  from unclip_jax.data import tokenizer

  vocab, merges = tokenizer.load_vocab_and_merges()
  return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16, pad_token="!")


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
  """(torch CLIPModel, CLIPImageProcessor, folder): random tiny CLIP with the real vocabulary, legacy EOS pooling."""
  torch = pytest.importorskip("torch")
  import transformers

  text = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=16, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=2,
              pad_token_id=1)
  vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8, hidden_act="quick_gelu")
  model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
  torch.manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.2)
  model.eval()
  proc = transformers.CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
  d = tmp_path_factory.mktemp("hf_clip")
  model.save_pretrained(d)
  proc.save_pretrained(d)
  return model, proc, str(d)


def _reference_scores(model, proc, images, ids):
  import torch

  with torch.no_grad():
    px = torch.tensor(proc(images=images, return_tensors="np")["pixel_values"])
    img = model.get_image_features(pixel_values=px)
    txt = model.get_text_features(input_ids=torch.tensor(np.asarray(ids, np.int64)))
    img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return (100 * (img * txt).sum(-1)).numpy().astype(np.float64)


def test_parity_with_transformers_clipmodel(hf_clip):
  model, proc, folder = hf_clip
  clip = cs.load_clip(folder)
  assert clip.kind == "transformers" and (clip.resize_size, clip.crop_size) == (40, 32) and clip.context_length == 16
  images, prompts = _images(5), PROMPTS[:4] + [LONG]
  out = cs.clip_score(images, prompts, clip=clip, batch_size=2)  # 3 batches, the last one padded
  ids, _ = cs.CLIPScorer(clip, batch_size=2).tokenize(prompts)
  assert ids[-1, -1] == 49407 and out["n_truncated"] == 1       # truncated with EOS kept
  ref_ids = _hf_tokenizer()(prompts[:4], padding="max_length", max_length=16)["input_ids"]
  np.testing.assert_array_equal(np.asarray(ref_ids), ids[:4])    # same tokens as transformers' tokenizer
  want = _reference_scores(model, proc, images, ids)
  err = np.max(np.abs(out["scores"] - want))
  print(f"per-pair 100·cos: max|Δ| = {err:.2e} (ref {np.round(want, 3)})")
  assert err < TOL
  assert out["clip_score"] == pytest.approx(np.maximum(want, 0).mean(), abs=TOL)
  assert out["clip_score_torchmetrics"] == pytest.approx(max(want.mean(), 0), abs=TOL)


def _import_torchmetrics_clip_score():
  """torchmetrics' functional clip_score with torch-fidelity / torchvision hidden from its import-time checks."""
  try:
    importlib.metadata.version("torchmetrics")
  except importlib.metadata.PackageNotFoundError:
    pytest.skip("torchmetrics is not installed (pip install --no-deps torchmetrics lightning-utilities)")
  if "torchmetrics" not in sys.modules:
    import lightning_utilities.core.imports as lu

    hidden = ("torch_fidelity", "torchvision")
    saved = {k: sys.modules[k] for k in list(sys.modules) if k.split(".")[0] in hidden}
    version = lu._version

    def _version(name):
      if name.replace("-", "_") in hidden:
        raise importlib.metadata.PackageNotFoundError(name)
      return version(name)

    lu._version = _version
    for k in saved:
      del sys.modules[k]
    for k in hidden:
      sys.modules[k] = None
    try:
      import torchmetrics  # noqa: F401
    except ImportError as e:
      pytest.skip(f"torchmetrics does not import here: {e}")
    finally:
      lu._version = version
      for k in hidden:
        sys.modules.pop(k, None)
      sys.modules.update(saved)
  from torchmetrics.functional.multimodal import clip_score

  return clip_score


class _TensorFeatures:
  """The CLIPModel as torchmetrics 1.9 expects: `get_*_features` returning tensors (transformers 5 returns
  `BaseModelOutputWithPooling`, the projected embeddings in `pooler_output`)."""

  def __init__(self, model):
    self.model, self.config = model, model.config

  def to(self, device):
    return self

  def get_image_features(self, *args, **kwargs):
    out = self.model.get_image_features(*args, **kwargs)
    return getattr(out, "pooler_output", out)

  def get_text_features(self, *args, **kwargs):
    out = self.model.get_text_features(*args, **kwargs)
    return getattr(out, "pooler_output", out)


def test_parity_with_torchmetrics(hf_clip):
  import torch
  import transformers

  tm_clip_score = _import_torchmetrics_clip_score()
  model, proc, folder = hf_clip
  processor = transformers.CLIPProcessor(image_processor=proc, tokenizer=_hf_tokenizer())
  images, prompts = _images(5, seed=3), PROMPTS
  want = float(tm_clip_score([torch.from_numpy(im).permute(2, 0, 1) for im in images], prompts,
                             model_name_or_path=lambda: (_TensorFeatures(model), processor)))
  got = cs.clip_score(images, prompts, clip=cs.load_clip(folder), batch_size=4)
  print(f"torchmetrics {want:.5f}, ours {got['clip_score_torchmetrics']:.5f} (mean of clamps {got['clip_score']:.5f})")
  assert got["clip_score_torchmetrics"] == pytest.approx(want, abs=TOL)


# ---- inputs -------------------------------------------------------------------------------------------------------
def _write_folder(d, images, prompts, sidecar="json"):
  os.makedirs(d, exist_ok=True)
  for k, (im, p) in enumerate(zip(images, prompts)):
    Image.fromarray(im).save(os.path.join(d, f"{k:04d}.png"))
    if sidecar == "json":
      with open(os.path.join(d, f"{k:04d}.json"), "w") as f:
        json.dump({"prompt": p, "seed": k}, f)
  return str(d)


def test_inputs_folder_shards_captions(tmp_path):
  images = _images(3)
  folder = _write_folder(tmp_path / "samples", images, PROMPTS[:3])
  Image.fromarray(images[0]).save(tmp_path / "samples" / "grid.png")  # sample.py's grid: skipped
  pairs = cs.read_pairs(folder)
  assert len(pairs) == 3 and pairs.prompts == tuple(PROMPTS[:3])
  names, ims, ps = zip(*pairs)
  np.testing.assert_array_equal(ims[1], images[1])

  shard = tmp_path / "data-000.tar"
  with tarfile.open(shard, "w") as tf:
    for k in range(3):
      for ext in ("json", "png") if k != 2 else ("png", "txt"):
        src = tmp_path / "samples" / f"{k:04d}.{ext if ext != 'txt' else 'json'}"
        if ext == "txt":
          src = tmp_path / "cap.txt"
          src.write_text(PROMPTS[k] + "\n")
        tf.add(src, arcname=f"key{k}.{ext}")
  assert cs.read_pairs(str(shard)).prompts == tuple(PROMPTS[:3])

  plain = _write_folder(tmp_path / "plain", images, PROMPTS[:3], sidecar=None)
  with pytest.raises(cs.PairsError, match=r"no prompt for image .*0000\.png"):
    cs.read_pairs(plain)
  jsonl = tmp_path / "caps.jsonl"
  jsonl.write_text("".join(json.dumps({"file": f"{k:04d}.png", "caption": p}) + "\n"
                           for k, p in enumerate(PROMPTS[:3])))
  assert cs.read_pairs(plain, str(jsonl)).prompts == tuple(PROMPTS[:3])
  csv_file = tmp_path / "caps.csv"
  csv_file.write_text("file_name,caption\n" + "".join(f'{k:04d}.png,"{p}"\n' for k, p in enumerate(PROMPTS[:3])))
  assert cs.read_pairs(plain, str(csv_file)).prompts == tuple(PROMPTS[:3])
  jsonl.write_text(json.dumps({"file": "0000.png", "caption": "x"}) + "\n")
  with pytest.raises(cs.PairsError, match=r"no caption for image .*0001\.png"):
    cs.read_pairs(plain, str(jsonl))
  (tmp_path / "samples" / "0001.json").write_text(json.dumps({"seed": 1}))
  with pytest.raises(cs.PairsError, match=r"0001\.json has no \"prompt\" field"):
    cs.read_pairs(folder)


def test_load_clip_kinds_and_errors(tmp_path):
  bundle_clip = cs.load_clip()  # the embedded bundle
  assert bundle_clip.kind == "bundle" and bundle_clip.crop_size == 32 and bundle_clip.context_length == 16
  comp = cs.load_clip(cs.default_bundle_path() / "clip")
  assert comp.kind == "component" and comp.fingerprint == bundle_clip.fingerprint
  with pytest.raises(cs.CLIPLoadError, match="path not found"):
    cs.load_clip(tmp_path / "nope")
  with pytest.raises(cs.CLIPLoadError, match="no clip/config.json"):
    cs.load_clip(tmp_path)
  with pytest.raises(cs.CLIPLoadError, match="not a clip component"):
    cs.load_clip(cs.default_bundle_path() / "prior")


# ---- CLI ----------------------------------------------------------------------------------------------------------
def _shapes_folders(tmp_path, n=8):
  from unclip_jax.shapes.folder import write_real_folder

  real = tmp_path / "real"
  prompts = write_real_folder(real, n)
  return str(real), prompts


def test_cli_clip_score_and_clip_fd(tmp_path, capsys):
  real, prompts = _shapes_folders(tmp_path)
  out_json = tmp_path / "r.json"
  assert cli.main(["clip-score", "--images", real, "--batch-size", "4", "--json", str(out_json),
                   "--scores", str(tmp_path / "s.jsonl")]) == 0
  report = json.loads(out_json.read_text())
  assert report["metric"] == "clip_score" and report["n"] == 8 and report["clip_kind"] == "bundle"
  assert report["clip_score"] > 80  # the embedded CLIP on its own training distribution
  assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 8
  # mismatched captions (rolled by one) score far lower
  mism = tmp_path / "mism.jsonl"
  mism.write_text("".join(json.dumps({"file": f"{k:04d}.png", "caption": prompts[(k + 4) % 8]}) + "\n"
                          for k in range(8)))
  assert cli.main(["clip-score", "--images", real, "--captions", str(mism), "--json", str(out_json)]) == 0
  assert json.loads(out_json.read_text())["clip_score"] < report["clip_score"] - 20

  fake = _write_folder(tmp_path / "fake", _images(8, seed=5), prompts)
  stats = tmp_path / "real_clip.npz"
  capsys.readouterr()
  assert cli.main(["fid", "--features", "clip", "--real", real, "--fake", fake, "--save-real-stats", str(stats),
                   "--batch-size", "4"]) == 0
  r1 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert r1["features"] == "clip-image-embeds" and r1["n_real"] == 8 and r1["fid"] > 0
  assert cli.main(["fid", "--features", "clip", "--real", str(stats), "--fake", fake, "--batch-size", "4"]) == 0
  r2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert r2["fid"] == pytest.approx(r1["fid"], rel=1e-6) and r2["weights_fingerprint"] == r1["weights_fingerprint"]
  assert cli.main(["fid", "--features", "clip", "--real", real, "--fake", real]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fid"] == pytest.approx(0, abs=1e-3)
  # the cache refuses other features (inception) and other weights
  assert cli.main(["fid", "--real", str(stats), "--fake", fake, "--inception-weights", "x.pth"]) == 2
  assert "holds 'clip-image-embeds' features" in capsys.readouterr().err
  from unclip_jax.eval import fid as fid_lib

  s = fid_lib.FIDStats.load(stats)
  s.fingerprint = "0123456789abcdef"
  s.save(stats)
  assert cli.main(["fid", "--features", "clip", "--real", str(stats), "--fake", fake]) == 2
  assert "other weights" in capsys.readouterr().err
  assert cli.main(["fid", "--features", "clip", "--protocol", "pytorch-fid", "--real", real, "--fake", fake]) == 2
  assert "use --protocol clean" in capsys.readouterr().err


def test_cli_errors(tmp_path, capsys):
  plain = _write_folder(tmp_path / "plain", _images(2), PROMPTS[:2], sidecar=None)
  assert cli.main(["clip-score", "--images", plain]) == 2
  assert "no prompt for image" in capsys.readouterr().err
  assert cli.main(["clip-score", "--images", str(tmp_path / "missing")]) == 2
  assert "path not found" in capsys.readouterr().err
  folder = _write_folder(tmp_path / "ok", _images(2), PROMPTS[:2])
  assert cli.main(["clip-score", "--images", folder, "--clip", str(tmp_path)]) == 2
  assert "--clip" in capsys.readouterr().err
  assert cli.main(["clip-score", "--images", folder, "--batch-size", "0"]) == 2


@pytest.mark.slow
def test_end_to_end_shapes(tmp_path):
  """The embedded model's samples for 4 shapes prompts vs real images for the same prompts."""
  real, prompts = _shapes_folders(tmp_path, n=4)
  (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
  env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
  start = time.perf_counter()
  subprocess.run([sys.executable, "-m", "unclip_jax.sample", "--prompts-file", str(tmp_path / "p.txt"), "--out",
                  str(tmp_path / "gen"), "--no-progress", "--batch-size", "4"], check=True, env=env)
  gen = cs.read_pairs(str(tmp_path / "gen"))  # grid.png skipped, prompts from the NNNN.json sidecars
  assert gen.prompts == tuple(prompts)
  clip = cs.load_clip()
  score_gen = cs.clip_score([im for _, im, _ in gen], list(gen.prompts), clip=clip, batch_size=4)
  score_real = cs.clip_score([im for _, im, _ in cs.read_pairs(real)], prompts, clip=clip, batch_size=4)
  print(f"CLIP score generated {score_gen['clip_score']:.2f}, real {score_real['clip_score']:.2f} "
        f"({time.perf_counter() - start:.0f} s)")
  assert score_gen["clip_score"] > 70 and score_real["clip_score"] > 80


_SHARDED = r"""
import json, sys
import jax, numpy as np
from unclip_jax.eval import clip_score as cs
rng = np.random.default_rng(0)
images = [rng.integers(0, 256, (40, 36, 3), dtype=np.uint8) for _ in range(6)]
prompts = ["a red circle", "a blue square on a white background", "green triangle"] * 2
clip = cs.load_clip()
out = {}
for name, devices, bs in (("one", jax.local_devices()[:1], 4), ("two", jax.local_devices(), 4),
                          ("odd", jax.local_devices(), 3)):
  s = cs.CLIPScorer(clip, batch_size=bs, devices=devices)
  raw, _ = s.score_pairs((str(i), im, p) for i, (im, p) in enumerate(zip(images, prompts)))
  out[name] = {"scores": raw.tolist(), "sharded": s.sharded, "devices": s.num_devices}
print(json.dumps(out))
"""


def test_sharded_over_two_host_devices():
  """Batches sharded by rows over 2 (forced host) devices give the one-device scores; 3 rows replicate."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  proc = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True, env=env, check=True)
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["two"]["devices"] == 2 and out["two"]["sharded"] and not out["odd"]["sharded"]
  np.testing.assert_allclose(out["two"]["scores"], out["one"]["scores"], atol=1e-4)
  np.testing.assert_allclose(out["odd"]["scores"], out["one"]["scores"], atol=1e-4)
