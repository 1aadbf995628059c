"""Config -> device mesh with axes ('data', 'fsdp', 'tensor'), Auto axis types so Linen constraints apply."""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(sizes: dict | Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves the sizes of MESH_AXES (one may be -1: "all remaining devices") for `num_devices` devices.

  Raises:
    ValueError: more than one -1, a size < 1, or sizes whose product is not `num_devices`.
  """
  if isinstance(sizes, dict) or hasattr(sizes, "keys"):
    unknown = set(sizes.keys()) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    sizes = [int(sizes.get(name, 1)) for name in MESH_AXES]
  sizes = [int(s) for s in sizes]
  if len(sizes) != len(MESH_AXES):
    raise ValueError(f"mesh needs {len(MESH_AXES)} sizes for {MESH_AXES}, got {sizes}")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s < 1 and s != -1 for s in sizes):
    raise ValueError(f"mesh axis sizes must be >= 1 or -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices cannot be split as {dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"but {num_devices} are available")
  return tuple(sizes)


def make_mesh(sizes, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A Mesh over `devices` (default: all) with axes MESH_AXES, every axis `AxisType.Auto`.

  `jax.make_mesh` defaults to Explicit axes, under which Linen's logical constraints only assert; Auto axes
  let `nn.with_logical_constraint` and `with_sharding_constraint` shard (use it under `jax.set_mesh`).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(sizes, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.array(devices).reshape(shape)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
