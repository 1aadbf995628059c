"""FID (#20): the Flax FID InceptionV3 + converter against a public torch port, the Fréchet distance against
pytorch-fid's formula, the two resize protocols against clean-fid / torch, and the `fid` CLI end to end.

References (installed with `pip install --no-deps`, see requirements/fid-reference.txt; tests skip without them):
  - torch-fidelity 0.4.0 `feature_extractor_inceptionv3.FeatureExtractorInceptionV3`: a pure-torch port of
    pytorch-fid's FID Inception with the same state-dict keys. pytorch-fid itself builds torchvision's Inception3
    and torchvision does not import beside the pinned CPU torch; torch-fidelity's package `__init__` imports
    torchvision too (for its CLIP extractor), so the test imports the one submodule under a stub parent package.
  - pytorch-fid 0.3.0 `fid_score.calculate_frechet_distance`: `fid_score` imports torchvision at the top, so the
    test compiles that one function from the installed source file (ast) with numpy and scipy.linalg.
  - clean-fid 0.1.35 `cleanfid.resize.make_resizer` (imports only numpy, torch and PIL).
All weights are random (built here). For the parity tests the reference's BatchNorm running statistics are calibrated
on random images, then perturbed, and the affine parameters randomised, so a wrong key, transpose, epsilon or pooling
mode changes the features (count_include_pad=True: 14% of the feature scale; eps 1e-5: 58%; tolerance 5e-5). The
converter and CLI tests use a synthetic state dict built from the converter's expected keys, so they run without
the reference packages.
"""
from __future__ import annotations

import ast
import copy
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import types
import warnings

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from helpers import synthetic_inception_state_dict  # noqa: E402
from unclip_jax.eval import fid as fid_lib  # noqa: E402
from unclip_jax.eval import images as images_lib  # noqa: E402
from unclip_jax.convert import inception as inception_weights
from unclip_jax.eval import protocols  # noqa: E402
from unclip_jax.eval.__main__ import main as eval_main  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------- references


def _torch_fidelity_inception():
  """torch_fidelity.feature_extractor_inceptionv3 without running torch_fidelity/__init__ (torchvision)."""
  spec = importlib.util.find_spec("torch_fidelity")
  if spec is None:
    pytest.skip("torch-fidelity not installed (pip install --no-deps -r requirements/fid-reference.txt)")
  if "torch_fidelity" not in sys.modules:
    stub = types.ModuleType("torch_fidelity")
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = stub
  return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")


def _pytorch_fid_frechet():
  """pytorch-fid's `calculate_frechet_distance`, compiled from the installed fid_score.py (it imports torchvision)."""
  spec = importlib.util.find_spec("pytorch_fid")
  if spec is None:
    pytest.skip("pytorch-fid not installed (pip install --no-deps -r requirements/fid-reference.txt)")
  path = os.path.join(list(spec.submodule_search_locations)[0], "fid_score.py")
  tree = ast.parse(open(path).read(), path)
  fn = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "calculate_frechet_distance"]
  assert fn, f"no calculate_frechet_distance in {path}"
  from scipy import linalg
  namespace = {"np": np, "linalg": linalg}
  exec(compile(ast.Module(body=fn, type_ignores=[]), path, "exec"), namespace)
  return namespace["calculate_frechet_distance"]


@pytest.fixture(scope="module")
def reference():
  """torch-fidelity's FID InceptionV3 with random weights and calibrated, randomised BatchNorm; eval mode."""
  mod = _torch_fidelity_inception()
  cls = mod.FeatureExtractorInceptionV3
  real_load = cls.load_state_dict
  real_url = mod.load_state_dict_from_url
  try:  # construct without its download / file load
    mod.load_state_dict_from_url = lambda *a, **k: {}
    cls.load_state_dict = lambda self, *a, **k: None
    ref = cls("inception-v3-compat", ["2048", "logits"])
  finally:
    cls.load_state_dict = real_load
    mod.load_state_dict_from_url = real_url
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for m in ref.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.momentum = None  # cumulative average: one train-mode pass sets the running stats to that batch's
        m.reset_running_stats()
        m.weight.uniform_(0.5, 1.5, generator=g)
        m.bias.normal_(0.0, 0.2, generator=g)
    ref.fc.weight.normal_(0.0, 0.02, generator=g)
    ref.fc.bias.normal_(0.0, 0.1, generator=g)
    ref.train()
    ref(torch.randint(0, 256, (2, 3, 299, 299), generator=g, dtype=torch.uint8))
    ref.eval()
    for m in ref.modules():  # make mean/var clearly non-default and not exactly the batch's
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.add_(0.05 * torch.randn(m.running_mean.shape, generator=g))
        m.running_var.mul_(torch.empty(m.running_var.shape).uniform_(0.8, 1.25, generator=g))
  return ref


@pytest.fixture(scope="module")
def weights_file(reference, tmp_path_factory):
  path = tmp_path_factory.mktemp("inception") / inception_weights.FID_WEIGHTS_NAME
  torch.save(reference.state_dict(), path)
  return str(path)


@pytest.fixture(scope="module")
def synthetic_state_dict():
  return synthetic_inception_state_dict()


@pytest.fixture(scope="module")
def synthetic_weights_file(synthetic_state_dict, tmp_path_factory):
  path = tmp_path_factory.mktemp("synthetic") / inception_weights.FID_WEIGHTS_NAME
  torch.save(synthetic_state_dict, path)
  return str(path)


def _images(seed: int, n: int, size=(299, 299)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, *size, 3), dtype=np.uint8)


def _ref_forward(ref, images_uint8: np.ndarray):
  with torch.no_grad():
    pool, logits = ref(torch.from_numpy(images_uint8).permute(0, 3, 1, 2).contiguous())
  return pool.numpy(), logits.numpy()


# -------------------------------------------------------------------------------------- network + converter


def test_converter_keys_are_the_reference_keys(reference):
  sd_keys = {k for k in reference.state_dict() if not k.endswith("num_batches_tracked")}
  assert set(inception_weights.expected_torch_keys()) == sd_keys
  assert len(sd_keys) == 94 * 5 + 2  # 94 BasicConv2d (conv + 4 BN tensors) + fc weight/bias


def test_converter_errors_name_the_keys(synthetic_state_dict):
  sd = dict(synthetic_state_dict)
  del sd["Mixed_6b.branch7x7_2.conv.weight"]
  sd["Mixed_5b.extra.conv.weight"] = torch.zeros(1)
  sd["fc.bias"] = torch.zeros(1000)
  with pytest.raises(inception_weights.InceptionWeightsError) as e:
    inception_weights.convert_state_dict(sd)
  msg = str(e.value)
  assert "1 missing: Mixed_6b.branch7x7_2.conv.weight" in msg
  assert "1 unexpected: Mixed_5b.extra.conv.weight" in msg
  assert "1 mis-shaped: fc.bias" in msg and "(1008,)" in msg
  # num_batches_tracked is optional (older pytorch files lack it)
  sd = {k: v for k, v in synthetic_state_dict.items() if not k.endswith("num_batches_tracked")}
  variables = inception_weights.convert_state_dict(sd)
  assert set(variables) == {"params", "batch_stats"}


def test_weights_file_loads_safely_pth_and_safetensors(synthetic_state_dict, synthetic_weights_file, tmp_path):
  from safetensors.torch import save_file

  a = inception_weights.load_inception_variables(synthetic_weights_file)
  st = tmp_path / "inception.safetensors"
  save_file({k: v.contiguous() for k, v in synthetic_state_dict.items()}, str(st))
  b = inception_weights.load_inception_variables(st)
  flat_a, flat_b = inception_weights._flatten(a), inception_weights._flatten(b)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(flat_a[k], flat_b[k])
  kernel = a["params"]["Conv2d_1a_3x3"]["conv"]["kernel"]
  np.testing.assert_array_equal(kernel, synthetic_state_dict["Conv2d_1a_3x3.conv.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(a["params"]["fc"]["kernel"], synthetic_state_dict["fc.weight"].numpy().T)
  np.testing.assert_array_equal(a["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"],
                                synthetic_state_dict["Mixed_7c.branch_pool.bn.running_var"].numpy())
  # a pickle with code is refused by weights_only=True
  bad = tmp_path / "bad.pth"
  torch.save({"x": types.SimpleNamespace(a=1)}, bad)
  with pytest.raises(inception_weights.InceptionWeightsError, match="weights_only"):
    inception_weights.load_inception_variables(bad)
  with pytest.raises(inception_weights.InceptionWeightsError, match="not found"):
    inception_weights.load_inception_variables(tmp_path / "nope.pth")


def test_features_match_torch_fidelity_float32(reference, weights_file):
  """pool3 [2, 2048] and logits [2, 1008] vs the torch port, float32, 299x299 uint8 inputs."""
  import jax

  from unclip_jax.models.inception import InceptionV3FID

  imgs = _images(1, 2)
  ref_pool, ref_logits = _ref_forward(reference, imgs)
  variables = inception_weights.load_inception_variables(weights_file)
  # 299x299 input: both protocols skip the resize; torch-fidelity scales (x - 128) / 128 like "clean".
  x = np.stack([protocols.preprocess(im, "clean") for im in imgs])
  pool, logits = jax.jit(lambda v, x: InceptionV3FID().apply(v, x, logits=True))(variables, x)
  pool, logits = np.asarray(pool), np.asarray(logits)
  assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
  assert np.abs(ref_pool).max() > 0.1 and np.abs(ref_pool).std() > 0.01  # activations did not vanish
  # float32 rounding through 94 conv layers: measured max |diff| ~2e-6 of the feature scale (pool and logits);
  # the float64 test below shows the architecture itself is exact.
  for ours, ref in ((pool, ref_pool), (logits, ref_logits)):
    scale = np.abs(ref).max()
    assert np.abs(ours - ref).max() <= 5e-5 * scale, (np.abs(ours - ref).max(), scale)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=2e-5 * scale)


def test_features_match_torch_fidelity_float64(reference, weights_file):
  """In float64 both sides agree to rounding: the architecture (pools, eps, key mapping) is exact."""
  import jax
  import jax.numpy as jnp

  from unclip_jax.models.inception import InceptionV3FID

  ref64 = copy.deepcopy(reference).double()
  imgs = _images(2, 2)
  x = (torch.from_numpy(imgs).permute(0, 3, 1, 2).double() - 128) / 128
  with torch.no_grad():
    r = x
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                 "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                 "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool"):
      r = getattr(ref64, name)(r)
    ref_pool = r.flatten(1).numpy()
    ref_logits = ref64.fc(r.flatten(1)).numpy()
  variables = inception_weights.load_inception_variables(weights_file)
  with jax.enable_x64(True):
    v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    pool, logits = InceptionV3FID(dtype=jnp.float64).apply(v64, jnp.asarray(x.permute(0, 2, 3, 1).numpy()),
                                                          logits=True)
    pool, logits = np.asarray(pool), np.asarray(logits)
  assert pool.dtype == np.float64
  np.testing.assert_allclose(pool, ref_pool, rtol=0, atol=1e-10 * np.abs(ref_pool).max())
  np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-10 * np.abs(ref_logits).max())


def test_extractor_batches_and_pads(synthetic_weights_file):
  """Features do not depend on batch composition (last batch padded to the compiled shape)."""
  from unclip_jax.eval.features import build_feature_extractor

  imgs = _images(3, 3, size=(80, 96))
  items = [(f"im{i}", im) for i, im in enumerate(imgs)]
  ex2 = build_feature_extractor("inception", weights=synthetic_weights_file, protocol="pytorch-fid", batch_size=2)
  ex3 = build_feature_extractor("inception", weights=synthetic_weights_file, protocol="pytorch-fid", batch_size=3)
  f2, f3 = ex2.extract(items), ex3.extract(items)
  assert f2.shape == (3, 2048) and f2.dtype == np.float64
  assert np.isfinite(f2).all() and f2.std() > 1e-3  # synthetic weights give non-degenerate features
  np.testing.assert_allclose(f2, f3, rtol=1e-5, atol=1e-5 * np.abs(f3).max())
  assert ex2.fingerprint and len(ex2.fingerprint) == 16


# ----------------------------------------------------------------------------------------- Fréchet distance


def _random_stats(rng, n, d, shift=0.0):
  a = rng.normal(size=(d, d)) / np.sqrt(d)
  x = rng.normal(size=(n, d)) @ a + shift
  return fid_lib.feature_statistics(x)


@pytest.mark.filterwarnings("ignore:only")
def test_frechet_distance_matches_pytorch_fid():
  ref_fd = _pytorch_fid_frechet()
  rng = np.random.default_rng(0)
  for n, d in ((500, 64), (300, 128), (40, 64)):  # the last: rank-deficient covariances (n < d)
    mu1, s1 = _random_stats(rng, n, d)
    mu2, s2 = _random_stats(rng, n, d, shift=0.3)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      want = float(ref_fd(mu1, s1, mu2, s2))
    got = fid_lib.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9), (n, d)
    # the eigenvalue form gives the same trace (it avoids complex sqrtm of singular products)
    got_eigh = fid_lib.frechet_distance(mu1, s1, mu2, s2, method="eigh")
    assert got_eigh == pytest.approx(want, rel=1e-6 if n > d else 1e-4), (n, d)
  # identical statistics: 0 up to rounding relative to the trace (here rank-deficient)
  for method in ("sqrtm", "eigh"):
    assert abs(fid_lib.frechet_distance(mu1, s1, mu1, s1, method=method)) < 1e-6 * np.trace(s1)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_analytic(method):
  """Commuting (diagonal, rotated) covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
  rng = np.random.default_rng(3)
  d = 32
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = fid_lib.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T, method=method)
  assert got == pytest.approx(want, rel=1e-9)
  with pytest.raises(ValueError, match="differ in length"):
    fid_lib.frechet_distance(mu1, np.eye(d), mu2[:-1], np.eye(d - 1), method=method)


def test_statistics_as_pytorch_fid():
  x = np.random.default_rng(1).normal(size=(10, 5)).astype(np.float32)
  with pytest.warns(UserWarning, match="biased"):
    mu, sigma = fid_lib.feature_statistics(x)
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(mu, np.mean(x.astype(np.float64), axis=0))
  np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False))
  with pytest.raises(ValueError, match="at least 2"):
    fid_lib.feature_statistics(x[:1])


def test_stats_cache_roundtrip_and_refusal(tmp_path):
  x = np.random.default_rng(2).normal(size=(4, 3))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    s = fid_lib.FIDStats.from_features(x, protocol="clean", feature_name="inception-v3-pool3", fingerprint="ab")
  s.save(tmp_path / "s.npz")
  t = fid_lib.FIDStats.load(tmp_path / "s.npz")
  np.testing.assert_array_equal(t.mu, s.mu)
  np.testing.assert_array_equal(t.sigma, s.sigma)
  assert (t.n, t.protocol, t.features, t.fingerprint) == (4, "clean", "inception-v3-pool3", "ab")
  t.check_compatible("clean", "inception-v3-pool3", "ab")
  with pytest.raises(fid_lib.StatsMismatchError, match="protocol 'clean'"):
    t.check_compatible("pytorch-fid", "inception-v3-pool3", "ab")
  with pytest.raises(fid_lib.StatsMismatchError, match="features"):
    t.check_compatible("clean", "clip-vit-b16", "ab")
  with pytest.raises(fid_lib.StatsMismatchError, match="other weights"):
    t.check_compatible("clean", "inception-v3-pool3", "cd")
  np.savez(tmp_path / "plain.npz", mu=s.mu, sigma=s.sigma)  # pytorch-fid's format: no metadata
  plain = fid_lib.FIDStats.load(tmp_path / "plain.npz")
  with pytest.raises(fid_lib.StatsMismatchError, match="no protocol"):
    plain.check_compatible("clean", "inception-v3-pool3")


# -------------------------------------------------------------------------------------------------- protocols


@pytest.mark.parametrize("size", [(299, 299), (64, 80), (512, 384)])
def test_clean_protocol_is_clean_fid(size):
  resize_mod = pytest.importorskip("cleanfid.resize")
  img = _images(4, 1, size=size)[0]
  want = resize_mod.make_resizer("PIL", False, "bicubic", (299, 299))(img)  # clean-fid's build_resizer("clean")
  got = protocols.clean_resize(img)
  assert got.dtype == np.float32 and got.shape == (299, 299, 3)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(protocols.preprocess(img, "clean"), (want - 128) / 128)  # clean-fid's InceptionV3W


@pytest.mark.parametrize("size", [(299, 299), (64, 80), (512, 384), (300, 1000)])
def test_pytorch_fid_protocol_is_torch_bilinear(size):
  import torch.nn.functional as F

  img = _images(5, 1, size=size)[0]
  x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255  # torchvision ToTensor
  want = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)  # pytorch-fid resize_input
  want = (2 * want - 1)[0].permute(1, 2, 0).numpy()  # pytorch-fid normalize_input
  got = protocols.preprocess(img, "pytorch-fid")
  assert got.shape == (299, 299, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)  # measured 3.6e-7 (float32 summation order)


def test_protocol_errors():
  with pytest.raises(ValueError, match="unknown FID protocol"):
    protocols.preprocess(_images(0, 1, (10, 10))[0], "tf")
  with pytest.raises(ValueError, match="uint8 RGB"):
    protocols.preprocess(np.zeros((10, 10), np.uint8), "clean")


# ------------------------------------------------------------------------------------------------ image sources


def _write_folder(path, seed, n, size=(64, 64), ext="png"):
  os.makedirs(path, exist_ok=True)
  for i, im in enumerate(_images(seed, n, size)):
    Image.fromarray(im).save(os.path.join(path, f"{i:03d}.{ext}"))
  return str(path)


def _write_shard(path, seed, n, size=(48, 56)):
  import io

  with tarfile.open(path, "w") as tf:
    for i, im in enumerate(_images(seed, n, size)):
      for name, data in ((f"{i:06d}.png", _png_bytes(im)), (f"{i:06d}.txt", b"a caption")):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
  return str(path)


def _png_bytes(im):
  import io

  buf = io.BytesIO()
  Image.fromarray(im).save(buf, format="PNG")
  return buf.getvalue()


def test_image_sources(tmp_path):
  folder = _write_folder(tmp_path / "f", 0, 3)
  _write_folder(tmp_path / "f" / "sub", 1, 1, ext="jpg")
  src = images_lib.open_images(folder)
  assert len(src) == 4
  names = [n for n, _ in src]
  assert names == sorted(names)
  shard = _write_shard(tmp_path / "s-000.tar", 2, 3)
  _write_shard(tmp_path / "s-001.tar", 3, 2)
  got = list(images_lib.open_images(shard))
  assert len(got) == 3 and got[0][0].endswith(":000000.png") and got[0][1].shape == (48, 56, 3)
  np.testing.assert_array_equal(got[1][1], _images(2, 3, (48, 56))[1])
  assert len(images_lib.open_images(str(tmp_path / "s-*.tar"))) == 5
  with pytest.raises(images_lib.ImageSourceError, match="path not found"):
    images_lib.open_images(tmp_path / "missing")
  os.makedirs(tmp_path / "empty")
  with pytest.raises(images_lib.ImageSourceError, match="no images found"):
    images_lib.open_images(tmp_path / "empty")
  (tmp_path / "f" / "zz_broken.png").write_bytes(b"not a png")
  with pytest.raises(images_lib.ImageSourceError, match="zz_broken.png"):
    list(images_lib.open_images(folder))


# ------------------------------------------------------------------------------------------------------- CLI


def _run_cli(capsys, *argv):
  code = eval_main(["fid", *argv])
  out, err = capsys.readouterr()
  return code, out, err


@pytest.fixture
def tiny_features():
  """A registered 16-d test extractor (protocol preprocessing + a fixed projection) so CLI plumbing runs fast."""
  from unclip_jax.eval import features as features_lib

  proj = np.random.default_rng(0).normal(size=(10 * 10 * 3, 16)) / 30

  def factory(weights=None, protocol="clean", batch_size=2):
    return features_lib.FeatureExtractor(
        name="tiny-test", dim=16, protocol=protocol,
        preprocess=lambda im: protocols.preprocess(im, protocol),
        apply_batch=lambda x: x[:, ::30, ::30, :].reshape(x.shape[0], -1) @ proj, batch_size=batch_size,
        fingerprint=None)

  features_lib.register_feature_extractor("tiny", "tiny-test", replace=True)(factory)
  yield ["--features", "tiny"]
  features_lib._REGISTRY.pop("tiny")


@pytest.mark.filterwarnings("ignore:only")
def test_fid_cli_json_cache_and_refusal(tiny_features, tmp_path, capsys):
  real = _write_folder(tmp_path / "real", 10, 5, size=(64, 64))
  fake = _write_folder(tmp_path / "fake", 11, 4, size=(72, 60), ext="jpg")
  stats = str(tmp_path / "real_clean.npz")
  report = str(tmp_path / "out" / "report.json")
  common = [*tiny_features, "--batch-size", "2"]
  code, out, err = _run_cli(capsys, "--real", real, "--fake", fake, *common, "--save-real-stats", stats,
                            "--json", report)
  assert code == 0, err
  rec = json.loads(out.strip().splitlines()[-1])
  assert rec["metric"] == "fid" and rec["n_real"] == 5 and rec["n_fake"] == 4
  assert rec["protocol"] == "clean" and rec["features"] == "tiny-test" and rec["seconds"] > 0
  assert np.isfinite(rec["fid"]) and rec["fid"] > 0
  assert json.loads(open(report).read()) == rec
  # the cached real statistics give the same FID
  code, out, err = _run_cli(capsys, "--real", stats, "--fake", fake, *common)
  assert code == 0, err
  assert json.loads(out)["fid"] == pytest.approx(rec["fid"], rel=1e-9)
  cached = fid_lib.FIDStats.load(stats)
  assert (cached.n, cached.protocol, cached.features) == (5, "clean", "tiny-test")
  # a set against itself: 0
  code, out, err = _run_cli(capsys, "--real", stats, "--fake", real, *common, "--fd-method", "eigh")
  assert code == 0, err
  assert abs(json.loads(out)["fid"]) < 1e-9 + 1e-6 * rec["fid"]
  # a cache computed with another protocol (or other features) is refused
  code, out, err = _run_cli(capsys, "--real", stats, "--fake", fake, *common, "--protocol", "pytorch-fid")
  assert code == 2 and "protocol 'clean'" in err and out == ""
  code, out, err = _run_cli(capsys, "--real", stats, "--fake", fake, "--inception-weights", "unused.pth")
  assert code == 2 and "holds 'tiny-test' features" in err
  # a plain mu/sigma file (pytorch-fid's format) is refused unless labelled
  plain = str(tmp_path / "plain.npz")
  np.savez(plain, mu=cached.mu, sigma=cached.sigma)
  code, out, err = _run_cli(capsys, "--real", plain, "--fake", fake, *common)
  assert code == 2 and "no protocol/feature metadata" in err
  code, out, err = _run_cli(capsys, "--real", plain, "--fake", fake, *common, "--stats-protocol", "clean")
  assert code == 0 and json.loads(out)["fid"] == pytest.approx(rec["fid"], rel=1e-9)
  # the other protocol gives another number
  code, out, err = _run_cli(capsys, "--real", real, "--fake", fake, *common, "--protocol", "pytorch-fid")
  assert code == 0, err
  assert json.loads(out)["protocol"] == "pytorch-fid" and json.loads(out)["fid"] != pytest.approx(rec["fid"])


@pytest.mark.filterwarnings("ignore:only")
def test_fid_cli_shards(tiny_features, tmp_path, capsys):
  real = _write_shard(tmp_path / "real-000.tar", 20, 2)
  _write_shard(tmp_path / "real-001.tar", 21, 2)
  fake = _write_folder(tmp_path / "fake", 22, 3, size=(50, 50))
  code, out, err = _run_cli(capsys, "--real", str(tmp_path / "real-*.tar"), "--fake", fake, *tiny_features)
  assert code == 0, err
  rec = json.loads(out)
  assert rec["n_real"] == 4 and rec["n_fake"] == 3 and np.isfinite(rec["fid"])
  code, out, err = _run_cli(capsys, "--real", str(tmp_path / "real-000.tar"), "--fake", fake, *tiny_features)
  assert code == 0 and json.loads(out)["n_real"] == 2


@pytest.mark.filterwarnings("ignore:only")
def test_fid_cli_errors(tiny_features, synthetic_state_dict, tmp_path, capsys):
  good = _write_folder(tmp_path / "good", 30, 2)
  code, _, err = _run_cli(capsys, "--real", str(tmp_path / "nope"), "--fake", good, *tiny_features)
  assert code == 2 and "--real: path not found" in err and "nope" in err
  os.makedirs(tmp_path / "empty")
  code, _, err = _run_cli(capsys, "--real", good, "--fake", str(tmp_path / "empty"), *tiny_features)
  assert code == 2 and "--fake: no images found" in err
  one = _write_folder(tmp_path / "one", 31, 1)
  code, _, err = _run_cli(capsys, "--real", good, "--fake", one, *tiny_features)
  assert code == 2 and "at least 2 images" in err
  broken = _write_folder(tmp_path / "broken", 32, 2)
  (tmp_path / "broken" / "001.png").write_bytes(b"\x89PNG garbage")
  code, _, err = _run_cli(capsys, "--real", good, "--fake", broken, *tiny_features)
  assert code == 2 and "cannot read image" in err and "001.png" in err
  code, _, err = _run_cli(capsys, "--real", good, "--fake", str(tmp_path / "missing.npz"), *tiny_features)
  assert code == 2 and "--fake: statistics file not found" in err
  # Inception weights: required, must exist, every key checked
  code, _, err = _run_cli(capsys, "--real", good, "--fake", good)
  assert code == 2 and "--inception-weights is required" in err
  code, _, err = _run_cli(capsys, "--real", good, "--fake", good, "--inception-weights", str(tmp_path / "x.pth"))
  assert code == 2 and "not found" in err
  sd = dict(synthetic_state_dict)
  del sd["Mixed_7c.branch_pool.bn.running_var"]
  partial = tmp_path / "partial.pth"
  torch.save(sd, partial)
  code, _, err = _run_cli(capsys, "--real", good, "--fake", good, "--inception-weights", str(partial))
  assert code == 2 and "missing: Mixed_7c.branch_pool.bn.running_var" in err


@pytest.mark.slow
def test_fid_cli_inception_end_to_end(synthetic_weights_file, tmp_path, capsys):
  """The real Inception path in-process: folder vs folder, real stats cached and reused (2048-d FD on CPU)."""
  real = _write_folder(tmp_path / "real", 50, 3, size=(64, 64))
  fake = _write_folder(tmp_path / "fake", 51, 3, size=(72, 60), ext="jpg")
  stats = str(tmp_path / "real.npz")
  common = ["--inception-weights", synthetic_weights_file, "--batch-size", "2", "--fd-method", "eigh"]
  with pytest.warns(UserWarning, match="biased"):
    code, out, err = _run_cli(capsys, "--real", real, "--fake", fake, *common, "--save-real-stats", stats)
  assert code == 0, err
  rec = json.loads(out)
  assert (rec["n_real"], rec["n_fake"], rec["features"]) == (3, 3, "inception-v3-pool3") and rec["fid"] > 0
  cached = fid_lib.FIDStats.load(stats)
  assert cached.mu.shape == (2048,) and cached.fingerprint == rec["weights_fingerprint"]
  assert len(rec["weights_fingerprint"]) == 16
  with pytest.warns(UserWarning, match="biased"):
    code, out, err = _run_cli(capsys, "--real", stats, "--fake", fake, *common)
  assert code == 0, err
  assert json.loads(out)["fid"] == pytest.approx(rec["fid"], rel=1e-9)


@pytest.mark.slow
def test_fid_cli_module_entry_point(synthetic_weights_file, tmp_path):
  """`python -m unclip_jax.eval fid ...` in a fresh process prints one JSON line (default sqrtm)."""
  real = _write_folder(tmp_path / "real", 40, 2, size=(40, 40))
  fake = _write_folder(tmp_path / "fake", 41, 2, size=(40, 40))
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-m", "unclip_jax.eval", "fid", "--real", real, "--fake", fake,
                         "--inception-weights", synthetic_weights_file, "--protocol", "pytorch-fid"],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr
  rec = json.loads(proc.stdout.strip().splitlines()[-1])
  assert rec["n_real"] == 2 and rec["n_fake"] == 2 and rec["protocol"] == "pytorch-fid"
  assert "warning: only 2 real images: FID is strongly biased" in proc.stderr
