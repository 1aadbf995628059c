"""pytorch-fid's FID Inception weights (`pt_inception-2015-12-05-6726825d.pth`) -> Flax variables.

The weights file is not shipped or downloaded: users bring it (pytorch-fid's release asset
`pt_inception-2015-12-05-6726825d.pth`, or the same state dict saved as `.safetensors`). It is read safely:
`torch.load(path, map_location="cpu", weights_only=True)` (no pickle code runs) or `safetensors.numpy.load_file`.

The torch keys are those of torchvision's `Inception3(num_classes=1008, aux_logits=False)` with pytorch-fid's
patched blocks (torch-fidelity's port has the same keys). The mapping is a pure function of the key:

  X.conv.weight [O, I, kh, kw]      -> params/X/conv/kernel [kh, kw, I, O]
  X.bn.weight / X.bn.bias           -> params/X/bn/scale / params/X/bn/bias
  X.bn.running_mean / running_var   -> batch_stats/X/bn/mean / batch_stats/X/bn/var
  X.bn.num_batches_tracked          -> dropped (optional in the file; unused in eval mode)
  fc.weight [1008, 2048] / fc.bias  -> params/fc/kernel [2048, 1008] / params/fc/bias

Every key is checked against the Flax module: missing, unexpected and mis-shaped keys are errors that name them.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import numpy as np

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
_OPTIONAL_SUFFIX = ".num_batches_tracked"


class InceptionWeightsError(ValueError):
  """The weights file is missing, unreadable, or its keys/shapes do not match the FID InceptionV3."""


def torch_key_to_flax(key: str) -> tuple[str, tuple[str, ...], str]:
  """A torch key -> (collection, Flax path ending in the leaf name, transform 'conv' | 'dense' | 'copy').

  Raises KeyError for keys no FID InceptionV3 variable maps from.
  """
  parts = key.split(".")
  if len(parts) < 2:
    raise KeyError(key)
  *mods, leaf = parts
  if mods == ["fc"]:
    if leaf == "weight":
      return "params", ("fc", "kernel"), "dense"
    if leaf == "bias":
      return "params", ("fc", "bias"), "copy"
    raise KeyError(key)
  if mods[-1] == "conv" and leaf == "weight":
    return "params", (*mods, "kernel"), "conv"
  if mods[-1] == "bn":
    table = {"weight": ("params", "scale"), "bias": ("params", "bias"), "running_mean": ("batch_stats", "mean"),
             "running_var": ("batch_stats", "var")}
    if leaf in table:
      col, name = table[leaf]
      return col, (*mods, name), "copy"
  raise KeyError(key)


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


@functools.lru_cache(maxsize=1)
def expected_variable_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  """(collection, *path) -> shape of every variable of `InceptionV3FID` (with the fc head), from `eval_shape`."""
  import jax
  import jax.numpy as jnp

  from unclip_jax.models.inception import InceptionV3FID

  model = InceptionV3FID()
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 299, 299, 3)), logits=True))
  return {k: tuple(v.shape) for k, v in _flatten(shapes).items()}


_INVERSE_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _torch_key(path: tuple[str, ...]) -> str:
  """(collection, *modules, leaf) -> the torch key it converts from."""
  return ".".join(path[1:-1] + (_INVERSE_LEAF[path[-1]],))


def expected_torch_keys() -> list[str]:
  """The torch keys the converter requires (num_batches_tracked keys are optional and not listed)."""
  return sorted(_torch_key(path) for path in expected_variable_shapes())


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, v in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return out


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Torch state dict (tensors or arrays) -> {'params': ..., 'batch_stats': ...} for `InceptionV3FID`, float32."""
  expected = expected_variable_shapes()
  flat: dict[tuple[str, ...], np.ndarray] = {}
  unexpected, misshaped, misshaped_paths = [], [], set()
  for key, value in state_dict.items():
    if key.endswith(_OPTIONAL_SUFFIX):
      continue
    try:
      col, path, kind = torch_key_to_flax(key)
    except KeyError:
      unexpected.append(key)
      continue
    if (col, *path) not in expected:
      unexpected.append(key)
      continue
    arr = _to_numpy(value)
    if kind == "conv":
      arr = arr.transpose(2, 3, 1, 0) if arr.ndim == 4 else arr
    elif kind == "dense":
      arr = arr.T if arr.ndim == 2 else arr
    want = expected[(col, *path)]
    if tuple(arr.shape) != want:
      misshaped.append(f"{key}: file {tuple(_to_numpy(value).shape)} -> {tuple(arr.shape)}, model wants {want}")
      misshaped_paths.add((col, *path))
      continue
    flat[(col, *path)] = np.ascontiguousarray(arr, dtype=np.float32)
  missing = sorted(_torch_key(p) for p in expected if p not in flat and p not in misshaped_paths)
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing: " + ", ".join(missing))
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected: " + ", ".join(sorted(unexpected)))
  if misshaped:
    problems.append(f"{len(misshaped)} mis-shaped: " + "; ".join(misshaped))
  if problems:
    raise InceptionWeightsError("Not the FID InceptionV3 state dict (pytorch-fid's " + FID_WEIGHTS_NAME + "): "
                                + " | ".join(problems))
  return _unflatten(flat)


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
    return value.detach().cpu().numpy()
  return np.asarray(value)


def load_state_dict(path: str | os.PathLike) -> dict[str, Any]:
  """Read a torch state dict safely: .safetensors via safetensors, anything else via torch weights_only=True."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise InceptionWeightsError(f"Inception weights file not found: {path} (bring pytorch-fid's {FID_WEIGHTS_NAME})")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return dict(load_file(path))
  try:
    import torch
  except ImportError as e:  # pragma: no cover - torch is in the test extra
    raise InceptionWeightsError(f"reading {path} needs torch (or convert it to .safetensors)") from e
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise InceptionWeightsError(f"could not read {path} as a torch state dict with weights_only=True: {e}") from e
  if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
    sd = sd["state_dict"]
  if not isinstance(sd, Mapping):
    raise InceptionWeightsError(f"{path} holds a {type(sd).__name__}, not a state dict")
  return dict(sd)


def load_inception_variables(path: str | os.PathLike) -> dict[str, Any]:
  """pytorch-fid's FID Inception weights file -> Flax variables for `InceptionV3FID` (float32 numpy)."""
  try:
    return convert_state_dict(load_state_dict(path))
  except InceptionWeightsError as e:
    if os.fspath(path) in str(e):
      raise
    raise InceptionWeightsError(f"{os.fspath(path)}: {e}") from None
