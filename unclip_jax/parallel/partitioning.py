"""Parameter and batch shardings from logical axis names, with an FSDP fallback and a replication check."""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

FSDP_MIN_BYTES = 4 * 2 ** 20


def strip_boxes(tree):
  """Removes `nn.Partitioned` boxes without applying their sharding constraints (safe on abstract values)."""
  return nn.meta.map_axis_meta(lambda box: box.value, tree)


def logical_shardings(abstract_tree, mesh: jax.sharding.Mesh, rules) -> object:
  """NamedShardings for a (possibly `nn.Partitioned`-boxed) abstract tree; unannotated leaves replicate."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def _fsdp_spec(shape, spec: P, mesh: jax.sharding.Mesh, axis: str) -> P:
  """Shards the largest dimension divisible by the `axis` size over `axis`, if `axis` is not used yet."""
  size = mesh.shape[axis]
  used = {a for entry in spec for a in ((entry,) if isinstance(entry, str) else (entry or ()))}
  if size == 1 or axis in used:
    return spec
  entries = list(spec) + [None] * (len(shape) - len(spec))
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if entries[dim] is None and shape[dim] % size == 0:
      entries[dim] = axis
      return P(*entries)
  return spec


def param_shardings(abstract_params, mesh: jax.sharding.Mesh, rules, *, fsdp_axis: str = "fsdp",
                    min_bytes: int = FSDP_MIN_BYTES):
  """Shardings for parameters: logical rules first, then FSDP on the largest divisible dimension of any
  tensor of at least `min_bytes` that the rules leave unsharded over `fsdp_axis` (big_vision's fallback).

  Returns a tree of NamedShardings matching `strip_boxes(abstract_params)`.
  """
  logical = logical_shardings(abstract_params, mesh, rules)
  leaves = strip_boxes(abstract_params)

  def pick(leaf, sharding):
    nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    if nbytes < min_bytes:
      return sharding
    return NamedSharding(mesh, _fsdp_spec(leaf.shape, sharding.spec, mesh, fsdp_axis))

  return jax.tree.map(pick, leaves, logical)


def replicated_fraction(params, min_bytes: int = 0) -> float:
  """Fraction of all parameter bytes held in fully replicated tensors of at least `min_bytes` bytes."""
  sizes = [(x.nbytes, x.sharding.is_fully_replicated) for x in jax.tree.leaves(params)]
  total = sum(n for n, _ in sizes)
  return sum(n for n, replicated in sizes if replicated and n >= min_bytes) / max(total, 1)


def assert_sufficiently_sharded(params, tolerance: float = 0.02, min_bytes: int = 0) -> None:
  """Raises AssertionError when replicated tensors (of >= `min_bytes` each) hold more than `tolerance` of
  the parameter bytes. Small tensors (biases, norms) may stay replicated when `min_bytes` is set."""
  frac = replicated_fraction(params, min_bytes)
  if frac > tolerance:
    raise AssertionError(f"{frac:.1%} of parameter bytes are fully replicated (tolerance {tolerance:.1%}); "
                         "annotate the large kernels with logical axes or lower the FSDP threshold")
