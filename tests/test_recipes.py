"""launch/train_shapes.sh and launch/train_shapes2.sh end to end at rehearsal size (a few steps per stage): every
step runs, a rerun skips them all, and the bundles they write load and sample."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FLAGS = "--config.num_train_steps=3 --config.eval_every=0 --config.log_every=1 --config.ckpt_every=2"


def _run(script, out, timeout=1500):
  env = dict(os.environ, N="120", TRAIN_FLAGS=FLAGS, UNCLIP_VENV=str(pathlib.Path(sys.executable).parent.parent),
             UNCLIP_JAX_CACHE=str(out.parent / "xla_cache"))
  return subprocess.run(["bash", str(ROOT / "launch" / script), str(out)], env=env, capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT)


def _sample(bundle, prompt):
  from unclip_jax.inference.pipeline import UnCLIP

  return UnCLIP.from_bundle(bundle).generate([prompt], seed=0, batch_size=1).images


@pytest.mark.slow
@pytest.mark.parametrize("script, bundles, size, prompt", [
    ("train_shapes.sh", ("bundle",), 64, "a red circle on a white background"),
    ("train_shapes2.sh", ("bundle", "bundle_text"), 96, "a red circle to the left of a blue square on a white background"),
])
def test_recipe_rehearsal(script, bundles, size, prompt, tmp_path):
  out = tmp_path / "run"
  r = _run(script, out)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  times = json.loads((out / "times.json").read_text())
  assert set(bundles) <= set(times) and {"data", "clip", "embed", "prior", "upsampler"} <= set(times)
  again = _run(script, out, timeout=300)
  assert again.returncode == 0 and again.stdout.count("done before, skipping") == len(times), again.stdout
  for b in bundles:
    images = _sample(out / b, prompt)
    assert images.shape == (1, size, size, 3) and images.dtype.name == "uint8"
