"""Per-host numpy batch -> global `jax.Array`s, batch axis sharded over the data-parallel mesh axes.

Every process passes its own [B_local, ...] rows; the global array is [B_local · process_count, ...]
(`jax.make_array_from_process_local_data`). Strings (captions) and other non-numeric leaves stay on the host
as they are: tokenize them first if the step needs them.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")


def is_numeric(x: Any) -> bool:
  """bool/int/float leaves go to devices; str, bytes and object arrays stay on the host."""
  return not isinstance(x, (str, bytes)) and np.asarray(x).dtype.kind in "biuf"


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, batch_axes=DATA_AXES) -> NamedSharding:
  """Leading dimension over `batch_axes` (those present in the mesh), the rest replicated."""
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  return NamedSharding(mesh, P(axes or None, *([None] * (ndim - 1))))


def to_global(batch: Any, mesh: jax.sharding.Mesh, batch_axes=DATA_AXES) -> Any:
  """Pytree of per-host arrays -> same tree with numeric leaves as global jax.Arrays (strings untouched).

  The local batch size must be divisible by the number of local devices along `batch_axes`.
  """
  def leaf(x):
    if not is_numeric(x):
      return x
    x = np.asarray(x)
    if x.ndim == 0:
      raise ValueError("batch leaves need a leading batch axis; got a scalar")
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, batch_axes), x)
  return jax.tree.map(leaf, batch)
