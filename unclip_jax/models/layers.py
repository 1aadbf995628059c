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


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def _is_cuda() -> bool:
  """True when the default backend is an NVIDIA GPU (CUDA, not ROCm)."""
  if jax.default_backend() != "gpu":
    return False
  client = getattr(jax.devices()[0], "client", None)           # jax's own cuDNN check reads the same string
  return "cuda" in str(getattr(client, "platform_version", "") or "").lower()


def auto_attention(*, cuda: bool, dtype, head_dim: int, has_bias: bool) -> str:
  """What "auto" picks: cuDNN flash attention on a CUDA GPU for fp16/bf16 inputs with a head width that cuDNN
  takes on every architecture (<= 128, a multiple of 8) and no additive bias (cuDNN training with a bias needs
  even sequence lengths, and a [B, H, T, S] bias costs the memory traffic flash attention saves); else XLA."""
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  ok = cuda and half and head_dim <= 128 and head_dim % 8 == 0 and not has_bias
  return "cudnn" if ok else "xla"


def resolve_attention(implementation: str, dtype, head_dim: int, *, has_bias: bool) -> str:
  """Config value ("auto" | "xla" | "cudnn") -> the implementation this call uses ("xla" or "cudnn").

  Raises:
    ValueError: an unknown name, or "cudnn" asked for where there is no CUDA GPU.
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; choose one of "
                     f"{ATTENTION_IMPLEMENTATIONS}")
  if implementation == "auto":
    return auto_attention(cuda=_is_cuda(), dtype=dtype, head_dim=head_dim, has_bias=has_bias)
  if implementation == "cudnn" and not _is_cuda():
    raise ValueError(f"attention='cudnn' needs a CUDA GPU; the default backend is {jax.default_backend()!r} "
                     "(use 'auto' or 'xla')")
  return implementation


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
  """Scaled dot-product attention through `jax.nn.dot_product_attention`, XLA or cuDNN flash attention.

  Args:
    q: [B, Tq, H, D]; k, v: [B, Tk, H, D].
    bias: additive bias broadcastable to [B, H, Tq, Tk], or None.
    key_lengths: [B] int32 or None: row b attends to its first key_lengths[b] keys only (`pack_kept_keys`).
    implementation: "auto" (see `auto_attention`), "xla" or "cudnn".
  Returns:
    [B, Tq, H, D] in q's dtype. XLA runs the softmax in float32 (diffusers' `upcast_softmax`); cuDNN accumulates
    in float32.
  """
  impl = resolve_attention(implementation, q.dtype, q.shape[-1], has_bias=bias is not None)
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


@functools.lru_cache(maxsize=None)
def _warn_cudnn_fallback(reason: str) -> None:
  """Warns once per distinct reason (every attention layer of a model would otherwise repeat it)."""
  import warnings

  warnings.warn(f"attention 'auto': cuDNN flash attention is not available here ({reason}); using XLA",
                RuntimeWarning, stacklevel=3)
