"""PyTorch <-> Flax parameter layout shared by the converters (docs/layouts.md, "Naming" and "Fused projections").

  * diffusers key <-> param path: torch ModuleList/Sequential entries `name.<i>` <-> `name_<i>`, `weight` ->
    `kernel` (Linear, Conv2d) or `scale` (norms), `bias` stays; raw parameters keep their key as a 1-tuple path.
  * Linear weights are transposed ([O, I] <-> [I, O]); Conv2d weights go (O,I,kh,kw) <-> (kh,kw,I,O).
  * diffusers folders: `config.json` + `diffusion_pytorch_model.safetensors`, as `save_pretrained` writes them.
  * `.ckpt`/`.pt` files are read only with `torch.load(weights_only=True)` (no arbitrary unpickling).

The per-model name sets (raw params, norm, conv and indexed modules) live in each converter as a `Layout`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

import jax
import numpy as np

SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
DIFFUSERS_VERSION = "0.42.1"

Params = dict[str, Any]
Flat = dict[tuple[str, ...], Any]


@dataclasses.dataclass(frozen=True)
class Layout:
  """A model's module names for the key rule (docs/layouts.md, "Naming")."""
  raw: tuple[str, ...] = ()      # top-level parameters: key `name` <-> path ('name',), copied
  norms: tuple[str, ...] = ()    # modules whose `weight` is `scale`
  convs: tuple[str, ...] = ()    # Conv2d modules; every other `kernel` is a Linear one
  indexed: tuple[str, ...] = ()  # torch ModuleLists/Sequentials: `name.<i>` <-> `name_<i>`


# ---- trees ----------------------------------------------------------------------------------------------------
def flatten(tree, dtype=None) -> Flat:
  """Nested dict tree -> {path tuple: numpy leaf} (cast to `dtype` when given)."""
  return {tuple(k.key for k in path): np.asarray(leaf, dtype)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def flat_shapes(abstract) -> dict[tuple[str, ...], tuple[int, ...]]:
  """`jax.eval_shape(init)` tree -> {path tuple: shape}."""
  return {tuple(k.key for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}


def nest(flat: Mapping[tuple[str, ...], Any]) -> Params:
  """{path tuple: leaf} -> nested dict tree."""
  out: Params = {}
  for path, value in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return out


def check_tree(flat: Flat, expected: Mapping[tuple[str, ...], tuple[int, ...]]) -> None:
  """Raises a ValueError naming an unexpected, mis-shaped or missing parameter."""
  for path, arr in flat.items():
    if path not in expected:
      raise ValueError(f"unexpected parameter {'/'.join(path)}")
    if tuple(arr.shape) != expected[path]:
      raise ValueError(f"parameter {'/'.join(path)} has shape {tuple(arr.shape)}, expected {expected[path]}")
  missing = ["/".join(p) for p in expected if p not in flat]
  if missing:
    raise ValueError(f"params are missing {missing}")


# ---- diffusers keys <-> param paths ---------------------------------------------------------------------------
def key_to_path(key: str, layout: Layout, what: str) -> tuple[tuple[str, ...], str]:
  """'down_blocks.1.attentions.0.to_out.0.weight' -> (('down_blocks_1', ..., 'to_out_0', 'kernel'), kind).

  kind: 'linear' (transpose), 'conv' ((O,I,kh,kw) -> (kh,kw,I,O)), 'copy' (norms, biases, raw params).
  """
  if key in layout.raw:
    return (key,), "copy"
  *module, leaf = re.sub(r"\.(\d+)(?=\.|$)", r"_\1", key).split(".")
  if not module or leaf not in ("weight", "bias"):
    raise ValueError(f"unexpected {what} key {key!r}")
  if leaf == "bias":
    return tuple(module) + ("bias",), "copy"
  if module[-1] in layout.norms:
    return tuple(module) + ("scale",), "copy"
  return tuple(module) + ("kernel",), "conv" if module[-1] in layout.convs else "linear"


def path_to_key(path: tuple[str, ...], layout: Layout) -> str:
  """('transformer_blocks_3', 'attn1', 'to_out_0', 'kernel') -> 'transformer_blocks.3.attn1.to_out.0.weight'."""
  if len(path) == 1:
    return path[0]
  *module, leaf = path
  name = ".".join(re.sub(r"_(\d+)$", r".\1", m) if m.rsplit("_", 1)[0] in layout.indexed else m for m in module)
  return f"{name}.{'bias' if leaf == 'bias' else 'weight'}"


def to_numpy(value, key: str) -> np.ndarray:
  """numpy array or torch tensor -> numpy; a non-floating dtype raises a ValueError naming `key`."""
  if hasattr(value, "detach"):                       # torch.Tensor, without importing torch here
    value = value.detach().cpu().float().numpy()
  arr = np.asarray(value)
  if not np.issubdtype(arr.dtype, np.floating):
    raise ValueError(f"{key!r}: expected a floating-point tensor, got dtype {arr.dtype}")
  return arr


def to_flax(arr: np.ndarray, kind: str, key: str) -> np.ndarray:
  """torch layout -> Flax: Linear [O, I] -> [I, O], Conv2d (O,I,kh,kw) -> (kh,kw,I,O), else unchanged."""
  if kind == "linear":
    if arr.ndim != 2:
      raise ValueError(f"{key!r}: expected a 2-D Linear weight, got shape {arr.shape}")
    return arr.T
  if kind == "conv":
    if arr.ndim != 4:
      raise ValueError(f"{key!r}: expected a 4-D Conv2d weight, got shape {arr.shape}")
    return arr.transpose(2, 3, 1, 0)
  return arr


def to_torch(arr: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
  """Inverse of `to_flax`, chosen by the path (`kernel`) and rank (4-D: Conv2d)."""
  if path[-1] != "kernel":
    return arr
  return arr.transpose(3, 2, 0, 1) if arr.ndim == 4 else arr.T


def state_to_params(state: Mapping[str, Any], expected, layout: Layout, what: str) -> Params:
  """diffusers state dict (numpy or torch tensors) -> float32 params, checked against `expected` ({path: shape}).

  A missing, unexpected or mis-shaped key raises a ValueError naming it; `what` names the state dict.
  """
  flat = {}
  for key, value in state.items():
    path, kind = key_to_path(key, layout, what)
    if path not in expected:
      raise ValueError(f"unexpected key {key!r} in the {what} state dict (no parameter {'/'.join(path)})")
    arr = to_flax(to_numpy(value, key), kind, key)
    if arr.shape != expected[path]:
      raise ValueError(f"{key!r}: shape {tuple(to_torch(arr, path).shape)} does not match the model (expected "
                       f"{tuple(to_torch(np.empty(expected[path]), path).shape)})")
    flat[path] = arr.astype(np.float32)
  missing = [path_to_key(p, layout) for p in expected if p not in flat]
  if missing:
    raise ValueError(f"the {what} state dict is missing keys: {missing}")
  return nest(flat)


def params_to_state(params: Params, expected, layout: Layout) -> dict[str, np.ndarray]:
  """Params -> diffusers state dict (float32 numpy, torch layouts); checks the tree when `expected` is given."""
  flat = flatten(params, np.float32)
  if expected is not None:
    check_tree(flat, expected)
  return {path_to_key(path, layout): np.ascontiguousarray(to_torch(arr, path)) for path, arr in flat.items()}


# ---- files ----------------------------------------------------------------------------------------------------
def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file as numpy (a `gs://` file is read in one download)."""
  from unclip_jax import paths

  if paths.is_remote(path):
    from safetensors import SafetensorError
    from safetensors.numpy import load

    p = paths.as_path(path)
    if not p.is_file():
      raise FileNotFoundError(f"safetensors file not found: {path}")
    try:
      return load(p.read_bytes())
    except (SafetensorError, OSError, ValueError, TypeError) as e:
      raise ValueError(f"cannot read safetensors file {path}: {e}") from e
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"safetensors file not found: {path}")
  from safetensors import SafetensorError, safe_open

  try:
    with safe_open(path, framework="numpy") as f:
      return {key: f.get_tensor(key) for key in f.keys()}
  except (SafetensorError, OSError, ValueError, TypeError) as e:
    raise ValueError(f"cannot read safetensors file {path}: {e}") from e


def read_diffusers_folder(folder: str | os.PathLike, what: str, parse) -> tuple[Any, dict[str, np.ndarray]]:
  """diffusers folder -> (parse(config.json dict), state dict); `what` names the model in file-not-found errors.

  `parse` (which raises on options we do not support) runs before the weights are read.
  """
  folder = os.fspath(folder)
  cfg_path, st_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, SAFETENSORS_NAME)
  for path in (cfg_path, st_path):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"diffusers {what} file not found: {path}")
  try:
    with open(cfg_path) as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"cannot read diffusers config {cfg_path}: {e}") from e
  if not isinstance(config, dict):
    raise ValueError(f"diffusers config {cfg_path} is not a JSON object")
  parsed = parse(config)
  return parsed, read_safetensors(st_path)


def write_diffusers_folder(folder: str | os.PathLike, config: dict, state: dict[str, np.ndarray]) -> None:
  """Writes config.json + diffusion_pytorch_model.safetensors, the folder `from_pretrained` loads."""
  from safetensors.numpy import save_file

  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, CONFIG_NAME), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  save_file(state, os.path.join(folder, SAFETENSORS_NAME), metadata={"format": "pt"})


def load_torch_file(path: str | os.PathLike):
  """Whatever a `.ckpt`/`.pt`/`.th` file holds (`torch.load(weights_only=True)`), or a `.safetensors` state dict."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  import torch

  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt or unsafe files
    raise ValueError(f"cannot read checkpoint {path} with torch.load(weights_only=True): {e}") from e


def load_torch_state(path: str | os.PathLike) -> dict:
  """A `.ckpt`/`.pt`/`.safetensors` state dict; Lightning's 'state_dict' is unwrapped."""
  ckpt = load_torch_file(path)
  state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
  if not isinstance(state, dict):
    raise ValueError(f"{os.fspath(path)}: expected a state dict (or a Lightning checkpoint with 'state_dict')")
  return state


# ---- original (non-diffusers) state dicts --------------------------------------------------------------------
class Taker:
  """`take(name)` -> src[name], remembered in `used`; a missing name raises a ValueError naming `prefix + name`."""

  def __init__(self, src: Mapping[str, np.ndarray], what: str, prefix: str = ""):
    self.src, self.what, self.prefix, self.used = src, what, prefix, set()

  def __call__(self, name: str) -> np.ndarray:
    if name not in self.src:
      raise ValueError(f"{self.what} state dict is missing key {self.prefix + name!r}")
    self.used.add(name)
    return self.src[name]

  def unused(self) -> dict[str, np.ndarray]:
    """The entries of `src` not taken yet, in `src` order."""
    return {k: v for k, v in self.src.items() if k not in self.used}


# ---- fused attention projections (docs/layouts.md) -----------------------------------------------------------
def split_heads(weight: np.ndarray, bias: np.ndarray, num_heads: int, head_dim: int, k: int = 3):
  """Per-head interleaved fused projection -> k separate ones.

  Args:
    weight: [k·H·d, Cin] torch Linear/Conv1d-squeezed weight, rows [p0_h0, p1_h0, .., p0_h1, ...], each d long.
    bias: [k·H·d].
  Returns:
    ([w_0..w_{k-1}] each [H·d, Cin], [b_0..b_{k-1}] each [H·d]).
  """
  rows = k * num_heads * head_dim
  if weight.ndim != 2 or weight.shape[0] != rows or bias.shape != (rows,):
    raise ValueError(f"fused projection must be [{rows}, Cin] with bias [{rows}] for {num_heads} heads x "
                     f"{head_dim} x {k}; got {weight.shape} and {bias.shape}")
  w4, b3 = weight.reshape(num_heads, k, head_dim, -1), bias.reshape(num_heads, k, head_dim)
  return [w4[:, i].reshape(num_heads * head_dim, -1) for i in range(k)], [b3[:, i].reshape(-1) for i in range(k)]


def join_heads(weights, biases, num_heads: int, head_dim: int):
  """Inverse of `split_heads`: k weights [H·d, Cin] / biases [H·d] -> interleaved [k·H·d, Cin], [k·H·d]."""
  w = np.stack([x.reshape(num_heads, head_dim, -1) for x in weights], axis=1)
  b = np.stack([x.reshape(num_heads, head_dim) for x in biases], axis=1)
  return w.reshape(-1, w.shape[-1]), b.reshape(-1)
