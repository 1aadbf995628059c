"""The package as a user installs it: a wheel built from the checkout, installed (not editable) into a fresh venv
outside the checkout, converts a tiny diffusers Karlo folder, samples with the embedded model and loads the built-in
configs. The new venv reuses this environment's dependencies through a .pth line (no downloads), but not its
editable unclip_jax: `import unclip_jax` must come from the installed wheel."""
import json
import os
import pathlib
import subprocess
import sys
import sysconfig

import pytest

from helpers import save_tiny_karlo

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _run(cmd, cwd, env, timeout=600):
  out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
  return out.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(python of a fresh venv with the built wheel installed, env, work dir outside the checkout)."""
  pytest.importorskip("setuptools")
  tmp = tmp_path_factory.mktemp("wheel")
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
  _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", ROOT],
       cwd=tmp, env=env)
  wheels = list((tmp / "dist").glob("unclip_jax-*.whl"))
  assert len(wheels) == 1, wheels
  venv = tmp / "venv"
  _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp, env=env)
  python = venv / "bin" / "python"
  _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheels[0]], cwd=tmp, env=env)
  site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp, env=env).strip()
  # Dependencies from this environment; its site dir is added as a plain path, so its editable-install finder
  # (a .pth in that dir) is not run and cannot shadow the wheel.
  (pathlib.Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
  work = tmp / "work"
  work.mkdir()
  return python, env, work


def test_wheel_imports_from_site_packages(installed):
  python, env, work = installed
  out = _run([python, "-c", "import unclip_jax, unclip_jax.configs; print(unclip_jax.__file__); "
              "print(unclip_jax.configs.__file__)"], cwd=work, env=env)
  pkg, configs = out.split()
  assert "site-packages" in pkg and str(ROOT) not in pkg, pkg
  assert "site-packages" in configs and configs.endswith("configs/__init__.py"), configs


def test_wheel_loads_builtin_configs(installed):
  python, env, work = installed
  code = ("from unclip_jax import config_lib\n"
          "for spec in ('decoder:tiny', 'prior.py:karlo', 'upsampler:shapes', 'clip:vit_l14', 'ar_prior:tiny'):\n"
          "  cfg = config_lib.load_config(spec)\n"
          "  print(spec, cfg.stage, cfg.variant)\n")
  out = _run([python, "-c", code], cwd=work, env=env)
  assert "decoder:tiny decoder tiny" in out and "ar_prior:tiny ar_prior tiny" in out
  bad = subprocess.run([python, "-m", "unclip_jax.train", "--config", "decoder:nonesuch_variant_x", "--workdir",
                        work / "run"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "nonesuch_variant_x" in bad.stderr
  missing = subprocess.run([python, "-m", "unclip_jax.train", "--config", "no_such_stage", "--workdir", work / "run"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=300)
  assert missing.returncode != 0 and "built-in configs" in missing.stderr


def test_wheel_converts_and_samples(installed, tmp_path):
  python, env, work = installed
  src = save_tiny_karlo(tmp_path)["src"]
  _run([python, "-m", "unclip_jax.convert", "karlo-diffusers", src, work / "bundle"], cwd=work, env=env)
  manifest = json.loads((work / "bundle" / "bundle.json").read_text())
  assert set(manifest["components"]) == {"clip", "prior", "decoder", "super_res_first", "super_res_last"}
  out = _run([python, "-m", "unclip_jax.sample", "--prompt", "a red circle on a white background", "--out",
              work / "out", "--no-progress", "--compilation-cache", ""], cwd=work, env=env)
  assert json.loads(out.strip().splitlines()[-1])["written"] == 1
  assert (work / "out" / "0000.png").is_file() and (work / "out" / "grid.png").is_file()
