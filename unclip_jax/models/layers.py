"""Primitives shared by every model: norms with torch defaults, activations, timestep embeddings, attention.

Flax defaults differ from PyTorch (LayerNorm/GroupNorm eps 1e-6, tanh GELU); everything here uses the torch
values so converted weights reproduce the reference outputs (docs/layouts.md, "Numerics").

`dense`, `conv`, `layer_norm` and `group_norm` build the Flax layers every model uses, with float32 parameters
and logical axis names on every parameter (the mesh rules in `config_lib.AXIS_RULES` map them to mesh axes).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

TORCH_NORM_EPS = 1e-5

LayerNorm = functools.partial(nn.LayerNorm, epsilon=TORCH_NORM_EPS)
GroupNorm = functools.partial(nn.GroupNorm, epsilon=TORCH_NORM_EPS)

# Additive attention bias of a masked key. diffusers adds -10000 (the prior, text projection and UNet reproduce it
# bit for bit, including rows where every key is masked); transformers' CLIP adds finfo.min, for which -1e9 gives the
# same fp32 softmax (exp underflows to exactly 0).
DIFFUSERS_MASK_VALUE = -10000.0
CLIP_MASK_VALUE = -1e9


def dense(features: int, axes: tuple[str | None, str | None], dtype: Dtype, name: str | None = None, *,
          use_bias: bool = True, kernel_init=None) -> nn.Dense:
  """Dense with logical axes on its kernel [in, out] (and bias [out]); kernel init normal(0.02) unless given.

  `name` is left out inside `setup` (the attribute name names the layer)."""
  kernel_init = kernel_init or nn.initializers.normal(0.02)
  kw = {} if name is None else {"name": name}
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, **kw,
                  kernel_init=nn.with_logical_partitioning(kernel_init, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))


def conv(features: int, kernel: int, dtype: Dtype, name: str, *, zero_init: bool = False) -> nn.Conv:
  """Biased 'same' conv (kernel [kh, kw, in, out], logical axes conv_in/conv_out); padding (k-1)/2 like torch."""
  p = (kernel - 1) // 2
  init = nn.initializers.zeros_init() if zero_init else nn.initializers.lecun_normal()
  return nn.Conv(features, (kernel, kernel), padding=((p, p), (p, p)), dtype=dtype, param_dtype=jnp.float32,
                 name=name,
                 kernel_init=nn.with_logical_partitioning(init, (None, None, "conv_in", "conv_out")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)))


def layer_norm(dtype: Dtype, name: str | None = None, *, eps: float = TORCH_NORM_EPS) -> nn.LayerNorm:
  """torch LayerNorm (affine, eps 1e-5 unless given) with scale/bias on the "embed" axis."""
  kw = {} if name is None else {"name": name}
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, **kw,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))


def group_norm(groups: int, dtype: Dtype, name: str) -> nn.GroupNorm:
  """torch GroupNorm (eps 1e-5, affine); groups are contiguous channel blocks, so NHWC needs no permute."""
  return GroupNorm(num_groups=groups, dtype=dtype, param_dtype=jnp.float32, name=name,
                   scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("act_ch",)),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("act_ch",)))


REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable",
                  "everything_saveable")


def remat_policy(name: str):
  """Config `remat_policy` -> (wrap in nn.remat?, jax checkpoint policy). "none" disables remat, "full" saves
  nothing (recomputes every activation)."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {name!r}; choose one of {REMAT_POLICIES}")
  if name in ("none", "full"):
    return name == "full", None
  return True, getattr(jax.checkpoint_policies, name)


def maybe_remat(module_cls, policy: str):
  """`module_cls` wrapped in `nn.remat` with the named policy (unchanged for "none")."""
  wrap, jax_policy = remat_policy(policy)
  return nn.remat(module_cls, policy=jax_policy) if wrap else module_cls


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's GELU approximation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: jax.Array) -> jax.Array:
  """The erf GELU of torch.nn.GELU() (Flax's nn.gelu defaults to the tanh approximation)."""
  return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": exact_gelu, "gelu_tanh": nn.gelu, "silu": nn.silu}


def activation(name: str):
  """Looks an activation up by its config name; unknown names raise a ValueError listing the choices."""
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def timestep_embedding(t: jax.Array, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps, as diffusers `Timesteps` and GLIDE/ADM.

  Args:
    t: [B] timesteps.
    dim: embedding width (even).
  Returns:
    [B, dim] float32: [cos, sin] when `flip_sin_to_cos`, else [sin, cos].
  """
  if dim % 2:
    raise ValueError(f"timestep embedding dim must be even, got {dim}")
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


class TimestepEmbedding(nn.Module):
  """diffusers `TimestepEmbedding`: linear_1 -> SiLU -> linear_2.  [B, in] -> [B, features]."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, emb: jax.Array) -> jax.Array:
    emb = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(emb)
    return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(emb))


def attention_bias_from_mask(mask: jax.Array, *, masked_value: float = DIFFUSERS_MASK_VALUE) -> jax.Array:
  """Boolean keep-mask [..., T] -> additive bias [..., T]: 0 where kept, `masked_value` elsewhere.

  DIFFUSERS_MASK_VALUE (-10000) reproduces diffusers bit for bit; -inf gives the same fp32 softmax for rows with
  at least one kept key.
  """
  return jnp.where(mask.astype(bool), 0.0, masked_value).astype(jnp.float32)


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")


def _is_cuda() -> bool:
  """True when the default backend is an NVIDIA GPU (CUDA, not ROCm)."""
  if jax.default_backend() != "gpu":
    return False
  client = getattr(jax.devices()[0], "client", None)           # jax's own cuDNN check reads the same string
  return "cuda" in str(getattr(client, "platform_version", "") or "").lower()


def _context_mesh():
  """The abstract mesh set by `jax.set_mesh` (None when there is none)."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def _platform() -> str:
  """Where the program being traced runs: the context mesh's devices ("tpu" for a compile-only TPU topology
  traced on a CPU host), else the default backend."""
  mesh = _context_mesh()
  device = getattr(mesh, "abstract_device", None) if mesh is not None else None
  return getattr(device, "platform", None) or jax.default_backend()


def _splash_placeable() -> bool:
  """True when a Pallas kernel can be placed: under a context mesh (it runs inside `jax.shard_map`), or on a
  single device. Pallas kernels cannot be auto-partitioned, so with several devices and no mesh it is not."""
  return _context_mesh() is not None or jax.device_count() == 1


def splash_head_dim_ok(head_dim: int) -> bool:
  """Head widths the splash kernel is used for: multiples of 8 up to 256 (it tiles [block, head_dim] with the
  whole head in one block)."""
  return head_dim % 8 == 0 and 0 < head_dim <= 256


def auto_attention(*, cuda: bool, dtype, head_dim: int, has_bias: bool, tpu: bool = False,
                   splash_ok: bool = False) -> str:
  """What "auto" picks.

  CUDA GPU: cuDNN flash attention for fp16/bf16 inputs with a head width that cuDNN takes on every architecture
  (<= 128, a multiple of 8) and no additive bias (cuDNN training with a bias needs even sequence lengths, and a
  [B, H, T, S] bias costs the memory traffic flash attention saves).
  TPU: Pallas splash attention when the caller passes its masks as key masks (`splash_ok`: the UNet, and the CLIP
  towers and the prior through `self_attention`), with no additive bias and a head width `splash_head_dim_ok`
  takes, where the kernel can be placed (`_splash_placeable`).
  Else XLA."""
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if cuda and half and head_dim <= 128 and head_dim % 8 == 0 and not has_bias:
    return "cudnn"
  if tpu and splash_ok and not has_bias and splash_head_dim_ok(head_dim):
    return "splash"
  return "xla"


def resolve_attention(implementation: str, dtype, head_dim: int, *, has_bias: bool, splash_ok: bool = False) -> str:
  """Config value ("auto" | "xla" | "cudnn" | "splash") -> the implementation this call uses.

  `splash_ok`: the caller can run `splash_attention` (masks as key masks, no additive bias). "splash" on a
  backend other than TPU runs the kernel in Pallas interpret mode (slow; for tests).

  Raises:
    ValueError: an unknown name, "cudnn" where there is no CUDA GPU, or "splash" for a head width the kernel does
      not take.
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; choose one of "
                     f"{ATTENTION_IMPLEMENTATIONS}")
  if implementation == "auto":
    tpu = _platform() == "tpu" and splash_ok and _splash_placeable()
    return auto_attention(cuda=_is_cuda(), dtype=dtype, head_dim=head_dim, has_bias=has_bias, tpu=tpu,
                          splash_ok=splash_ok)
  if implementation == "cudnn" and not _is_cuda():
    raise ValueError(f"attention='cudnn' needs a CUDA GPU; the default backend is {jax.default_backend()!r} "
                     "(use 'auto' or 'xla')")
  if implementation == "splash" and not splash_head_dim_ok(head_dim):
    raise ValueError(f"attention='splash' needs a head width that is a multiple of 8 and at most 256, got "
                     f"{head_dim} (use 'auto' or 'xla')")
  return implementation


# ---- Pallas splash attention (TPU) -------------------------------------------------------------------------------
SPLASH_BLOCK = 128          # sequence lengths are padded to a multiple of this (the kernel's lane width)


def _splash_block(length: int) -> int:
  """The largest of 512, 256, 128 that divides `length` (a multiple of SPLASH_BLOCK)."""
  return next(b for b in (512, 256, SPLASH_BLOCK) if length % b == 0)


def _mesh_specs(mesh, batch: int, heads: int):
  """(batch axes, head axes) of the shard_map around the kernel: the active logical rules' "batch" and "heads"
  mesh axes (without rules: the mesh's "data" and "fsdp" axes for the batch), kept only while their sizes divide
  the batch / head count; the other mesh axes see the whole array (the kernel is replicated over them)."""
  spec = nn.logical_to_mesh_axes(("batch", "heads"))
  as_tuple = lambda e: () if e is None else ((e,) if isinstance(e, str) else tuple(e))
  batch_axes, head_axes = as_tuple(spec[0]), as_tuple(spec[1])
  if not batch_axes and not head_axes:
    batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)

  def fit(axes, n):
    kept, size = [], 1
    for a in axes:
      if a in mesh.axis_names and a not in kept and n % (size * mesh.shape[a]) == 0:
        kept.append(a)
        size *= mesh.shape[a]
    return tuple(kept) or None
  batch_axes = fit(batch_axes, batch)
  return batch_axes, fit(tuple(a for a in head_axes if a not in (batch_axes or ())), heads)


def _splash_local(q, k, v, kv_segments, *, causal: bool, interpret: bool):
  """The kernel on one shard: q [B, H, Tq, D] (already scaled), k, v [B, H, Tk, D], kv_segments [B, Tk] int32
  (0 = attend, 1 = masked); Tq, Tk multiples of SPLASH_BLOCK. -> [B, H, Tq, D]."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  b, h, tq, _ = q.shape
  tk = k.shape[2]
  shape = (tq, tk)
  head_mask = splash.CausalMask(shape) if causal else splash.FullMask(shape)
  bq, bkv = _splash_block(tq), _splash_block(tk)
  # Separate dq and dk/dv backward kernels: the fused one keeps a float32 partial dq per key block in HBM
  # (+115 MiB per chip at the Karlo 32² shape, bench/NOTES.md).
  blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                             block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
  kernel = splash.make_splash_mha(splash.MultiHeadMask([head_mask] * h), block_sizes=blocks, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)
  segments = splash.SegmentIds(q=jnp.zeros((b, tq), jnp.int32), kv=kv_segments)
  return jax.vmap(kernel)(q, k, v, segment_ids=segments)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None = None, *,
                     causal: bool = False, interpret: bool | None = None) -> jax.Array:
  """Scaled dot-product attention with the Pallas TPU splash kernel (`jax.experimental.pallas.ops.tpu.
  splash_attention`) and its dq and dk/dv kernels for gradients.

  Args:
    q: [B, Tq, H, D]; k, v: [B, Tk, H, D].
    key_mask: [B, Tk] bool (True = attend) or None. Every query must keep at least one key.
    causal: query i attends to keys j <= i only (Tq == Tk).
    interpret: run the kernel in Pallas interpret mode; default: unless the program runs on a TPU.
  Returns:
    [B, Tq, H, D] in q's dtype (float32 softmax statistics, as in the kernel).

  Both lengths are padded to a multiple of SPLASH_BLOCK (padded keys are masked through the kernel's segment ids:
  kept keys id 0, masked and padded keys id 1, queries 0; padded query rows are dropped). Under a context mesh
  (`jax.set_mesh`) the kernel runs inside `jax.shard_map` over the mesh's batch axes (and head axes when the
  heads divide), since Pallas kernels cannot be auto-partitioned.
  """
  b, tq, h, d = q.shape
  tk = k.shape[1]
  if causal and tq != tk:
    raise ValueError(f"causal splash attention needs as many queries as keys, got {tq} and {tk}")
  if interpret is None:
    interpret = _platform() != "tpu"
  pad_q, pad_k = -tq % SPLASH_BLOCK, -tk % SPLASH_BLOCK
  keep = jnp.ones((b, tk), bool) if key_mask is None else key_mask.astype(bool)
  segments = jnp.pad(jnp.where(keep, 0, 1).astype(jnp.int32), ((0, 0), (0, pad_k)), constant_values=1)
  heads_first = lambda x, pad: jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, pad), (0, 0)))
  qh = heads_first(q * jnp.asarray(d ** -0.5, q.dtype), pad_q)                       # [B, H, Tq', D]
  kh, vh = heads_first(k.astype(q.dtype), pad_k), heads_first(v.astype(q.dtype), pad_k)   # [B, H, Tk', D]
  local = functools.partial(_splash_local, causal=causal, interpret=interpret)
  mesh = _context_mesh()
  if mesh is not None:
    from jax.sharding import PartitionSpec as P

    batch_axes, head_axes = _mesh_specs(mesh, b, h)
    act, rows = P(batch_axes, head_axes, None, None), P(batch_axes, None)
    local = jax.shard_map(local, in_specs=(act, act, act, rows), out_specs=act, check_vma=False)
  out = local(qh, kh, vh, segments)                                                   # [B, H, Tq', D]
  return jnp.swapaxes(out[:, :, :tq], 1, 2)


def pack_kept_keys(k: jax.Array, v: jax.Array, key_mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Moves the kept keys (and their values) to the front, in order, so that a length can stand for the mask.

  k, v [B, S, H, D], key_mask [B, S] bool (True = attend) -> (k, v) [B, S, H, D] and lengths [B] int32: key j of
  row b is attended iff j < lengths[b]. Attention is invariant to the order of keys, so this equals masking.
  """
  order = jnp.argsort(~key_mask.astype(bool), axis=-1, stable=True)                  # kept first     [B, S]
  take = lambda x: jnp.take_along_axis(x, order[:, :, None, None], axis=1)
  return take(k), take(v), key_mask.astype(jnp.int32).sum(-1)


def _attend(q, k, v, *, bias=None, key_lengths=None, implementation: str = "xla"):
  """The one call into `jax.nn.dot_product_attention` (kept separate so tests can stand XLA in for cuDNN)."""
  return jax.nn.dot_product_attention(q, k, v, bias=bias, key_value_seq_lengths=key_lengths,
                                      implementation=implementation)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None, *,
                          key_lengths: jax.Array | None = None, implementation: str = "auto") -> jax.Array:
  """Scaled dot-product attention through `jax.nn.dot_product_attention` (XLA or cuDNN flash attention), or the
  Pallas splash kernel when asked for by name.

  Args:
    q: [B, Tq, H, D]; k, v: [B, Tk, H, D].
    bias: additive bias broadcastable to [B, H, Tq, Tk], or None (required None for "splash").
    key_lengths: [B] int32 or None: row b attends to its first key_lengths[b] keys only (`pack_kept_keys`).
    implementation: "auto" (see `auto_attention`; never splash here: callers that can give key masks call
      `splash_attention` or `self_attention`), "xla", "cudnn" or "splash".
  Returns:
    [B, Tq, H, D] in q's dtype. XLA runs the softmax in float32 (diffusers' `upcast_softmax`); cuDNN and splash
    accumulate in float32.
  """
  impl = resolve_attention(implementation, q.dtype, q.shape[-1], has_bias=bias is not None)
  if impl == "splash":
    if bias is not None:
      raise ValueError("attention='splash' takes key masks, not an additive bias (use 'xla' for this layer)")
    mask = None if key_lengths is None else jnp.arange(k.shape[1])[None, :] < key_lengths[:, None]
    return splash_attention(q, k, v, mask)
  if bias is not None:
    b, tq, h, _ = q.shape
    heads = h if impl == "xla" else 1       # cuDNN broadcasts over batch and heads; it needs the full Tq x Tk
    bias = jnp.broadcast_to(bias, (b, heads, tq, k.shape[1])).astype(q.dtype)
  if key_lengths is not None:
    key_lengths = key_lengths.astype(jnp.int32)
  if implementation == "auto" and impl == "cudnn":
    try:
      return _attend(q, k, v, bias=bias, key_lengths=key_lengths, implementation="cudnn")
    except (NotImplementedError, RuntimeError) as e:   # raised while tracing: this cuDNN / GPU cannot run it
      _warn_cudnn_fallback(f"{type(e).__name__}: {e}")   # (auto sends no bias to cuDNN)
      impl = "xla"
  return _attend(q, k, v, bias=bias, key_lengths=key_lengths, implementation=impl)


# ---- self-attention with a causal and/or key padding mask (CLIP towers, the prior) --------------------------------
# Masked keys: XLA and cuDNN add `masked_value` (diffusers' -10000, CLIP_MASK_VALUE) to their logits; splash replaces
# their logits by -0.7·float32 max. For a query row with at least one kept key both give the same float32 softmax:
# a masked key's weight underflows to exactly 0 either way (exp(-10000 + O(10)) = 0 in float32). Rows with no kept
# key differ (XLA: a softmax over the least-masked keys; splash: a uniform average over its computed key blocks);
# the callers say why theirs never reach an output.
def self_attention_bias(length: int, key_mask: jax.Array | None, *, causal: bool,
                        masked_value: float) -> jax.Array | None:
  """The additive bias of a causal and/or key-masked self-attention, or None when it masks nothing.

  Args:
    length: T (queries = keys).
    key_mask: [B, T] bool (True = attend) or None.
    causal: mask the keys after each query.
    masked_value: added to a masked logit; above the diagonal AND on a masked key it is added twice (diffusers'
      prior and this CLIP's text tower sum the two masks).
  Returns:
    [B or 1, 1, T, T] float32, or None.
  """
  bias = None
  if causal:
    bias = jnp.where(jnp.triu(jnp.ones((length, length), bool), k=1), masked_value, 0.0)[None, None]   # [1,1,T,T]
  if key_mask is not None:
    keys = attention_bias_from_mask(key_mask, masked_value=masked_value)[:, None, None, :]             # [B,1,1,T]
    bias = keys if bias is None else (keys + bias).astype(jnp.float32)
  return bias


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None = None, *,
                   causal: bool = False, masked_value: float = DIFFUSERS_MASK_VALUE,
                   implementation: str = "auto") -> jax.Array:
  """Self-attention whose only masks are a causal mask and a key padding mask (the UNet's pattern for them).

  Where `implementation` resolves to splash (`resolve_attention(..., splash_ok=True)`: "splash", or "auto" on a
  TPU) the masks go to `splash_attention` as they are; else to `dot_product_attention` (implementation as given)
  as one additive bias (`self_attention_bias`), the reference form.

  Args:
    q, k, v: [B, T, H, D].
    key_mask: [B, T] bool (True = attend) or None.
  Returns:
    [B, T, H, D] in q's dtype.
  """
  if resolve_attention(implementation, q.dtype, q.shape[-1], has_bias=False, splash_ok=True) == "splash":
    return splash_attention(q, k, v, key_mask, causal=causal)
  bias = self_attention_bias(q.shape[1], key_mask, causal=causal, masked_value=masked_value)
  return dot_product_attention(q, k, v, bias, implementation=implementation)


@functools.lru_cache(maxsize=None)
def _warn_cudnn_fallback(reason: str) -> None:
  """Warns once per distinct reason (every attention layer of a model would otherwise repeat it)."""
  import warnings

  warnings.warn(f"attention 'auto': cuDNN flash attention is not available here ({reason}); using XLA",
                RuntimeWarning, stacklevel=3)
