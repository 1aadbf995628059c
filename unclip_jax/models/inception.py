"""The FID InceptionV3 (TF `inception-2015-12-05` graph) as a Flax linen module, NHWC.

This is the network pytorch-fid builds for FID (`fid_inception_v3`: torchvision's Inception3 with the
`FIDInceptionA/C/E_1/E_2` patches) and that clean-fid and torch-fidelity port as well:

  - every conv is `BasicConv2d`: conv without bias -> BatchNorm (eps 1e-3, running statistics) -> ReLU;
  - the pooling branch of the A, C and E_1 blocks is a 3x3/1 average pool with padding 1 that does NOT count the
    padded zeros (TF's `avg_pool`, torch's `count_include_pad=False`);
  - the pooling branch of the last block (Mixed_7c, "E_2") is a 3x3/1 MAX pool with padding 1 (a quirk of the
    TF graph that FID inherited);
  - no auxiliary classifier; the head is a 1008-way linear layer (`fc`) on the 2048-d pool3 features.

Input: float32 images [N, H, W, 3] already scaled to the network's range [-1, 1] (see `unclip_jax.eval.protocols`
for the two resize/normalise protocols); H, W >= 75, normally 299. Output: pool3 features [N, 2048] and, with
`logits=True`, also the logits [N, 1008].

Submodule names are the torch module names (`Conv2d_1a_3x3`, `Mixed_5b.branch5x5_1`, ..., `fc`) and each
`BasicConv2d` holds `conv` and `bn`, so `unclip_jax.convert.inception` maps a torch key to a Flax path as a pure
function of the key (`X.conv.weight -> params/X/conv/kernel`, `X.bn.running_var -> batch_stats/X/bn/var`, ...).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

POOL_DIM = 2048
NUM_CLASSES = 1008
BN_EPS = 1e-3


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class BasicConv2d(nn.Module):
  """conv (no bias) -> BatchNorm(eps=1e-3, running stats) -> ReLU; NHWC in, NHWC out."""
  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: int | Sequence[int] = 0
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel_size), strides=_pair(self.strides), padding=((ph, ph), (pw, pw)),
                use_bias=False, precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average pool, padding 1, padded zeros not counted (TF / `count_include_pad=False`)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """Mixed_5b/5c/5d (pytorch-fid `FIDInceptionA`): out channels 224 + pool_features."""
  pool_features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda f, k, p, name: BasicConv2d(f, k, padding=p, precision=self.precision, name=name)  # noqa: E731
    b1 = conv(64, 1, 0, "branch1x1")(x)
    b5 = conv(48, 1, 0, "branch5x5_1")(x)
    b5 = conv(64, 5, 2, "branch5x5_2")(b5)
    b3 = conv(64, 1, 0, "branch3x3dbl_1")(x)
    b3 = conv(96, 3, 1, "branch3x3dbl_2")(b3)
    b3 = conv(96, 3, 1, "branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, 1, 0, "branch_pool")(_avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (torchvision `InceptionB`, unpatched): 35x35 -> 17x17, out channels 480 + C_in."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = BasicConv2d(384, 3, strides=2, precision=self.precision, name="branch3x3")(x)
    bd = BasicConv2d(64, 1, precision=self.precision, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, 3, padding=1, precision=self.precision, name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, 3, strides=2, precision=self.precision, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e (pytorch-fid `FIDInceptionC`): factorised 7x7 convs, out channels 768."""
  channels_7x7: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    conv = lambda f, k, p, name: BasicConv2d(f, k, padding=p, precision=self.precision, name=name)  # noqa: E731
    b1 = conv(192, 1, 0, "branch1x1")(x)
    b7 = conv(c7, 1, 0, "branch7x7_1")(x)
    b7 = conv(c7, (1, 7), (0, 3), "branch7x7_2")(b7)
    b7 = conv(192, (7, 1), (3, 0), "branch7x7_3")(b7)
    bd = conv(c7, 1, 0, "branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), (3, 0), "branch7x7dbl_2")(bd)
    bd = conv(c7, (1, 7), (0, 3), "branch7x7dbl_3")(bd)
    bd = conv(c7, (7, 1), (3, 0), "branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), (0, 3), "branch7x7dbl_5")(bd)
    bp = conv(192, 1, 0, "branch_pool")(_avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (torchvision `InceptionD`, unpatched): 17x17 -> 8x8, out channels 512 + C_in."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda f, k, s, p, name: BasicConv2d(f, k, strides=s, padding=p, precision=self.precision,  # noqa: E731
                                                 name=name)
    b3 = conv(192, 1, 1, 0, "branch3x3_1")(x)
    b3 = conv(320, 3, 2, 0, "branch3x3_2")(b3)
    b7 = conv(192, 1, 1, 0, "branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), 1, (0, 3), "branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), 1, (3, 0), "branch7x7x3_3")(b7)
    b7 = conv(192, 3, 2, 0, "branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b / Mixed_7c (pytorch-fid `FIDInceptionE_1` / `FIDInceptionE_2`): out channels 2048.

  `pool="avg"` (E_1): average pool excluding padding; `pool="max"` (E_2): 3x3/1 max pool, padding 1.
  """
  pool: str = "avg"
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda f, k, p, name: BasicConv2d(f, k, padding=p, precision=self.precision, name=name)  # noqa: E731
    b1 = conv(320, 1, 0, "branch1x1")(x)
    b3 = conv(384, 1, 0, "branch3x3_1")(x)
    b3 = jnp.concatenate([conv(384, (1, 3), (0, 1), "branch3x3_2a")(b3),
                          conv(384, (3, 1), (1, 0), "branch3x3_2b")(b3)], axis=-1)
    bd = conv(448, 1, 0, "branch3x3dbl_1")(x)
    bd = conv(384, 3, 1, "branch3x3dbl_2")(bd)
    bd = jnp.concatenate([conv(384, (1, 3), (0, 1), "branch3x3dbl_3a")(bd),
                          conv(384, (3, 1), (1, 0), "branch3x3dbl_3b")(bd)], axis=-1)
    if self.pool == "avg":
      pooled = _avg_pool_3x3_exclude_pad(x)
    elif self.pool == "max":
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {self.pool!r}")
    bp = conv(192, 1, 0, "branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3FID(nn.Module):
  """The FID InceptionV3: images [N, H, W, 3] in [-1, 1] -> pool3 [N, 2048] (and logits [N, 1008]).

  Attributes:
    precision: conv / matmul precision; HIGHEST by default so TPU/GPU features are float32-accurate (FID is
      sensitive to small feature shifts).
    dtype: the dtype the input is cast to (float32; float64 under `jax_enable_x64` for reference checks).
  """
  precision: Any = jax.lax.Precision.HIGHEST
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, logits: bool = False):
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"InceptionV3FID expects NHWC images [N, H, W, 3], got shape {x.shape}")
    if min(x.shape[1], x.shape[2]) < 75:
      raise ValueError(f"InceptionV3FID needs H, W >= 75 (normally 299), got {x.shape[1:3]}")
    p = self.precision
    x = x.astype(self.dtype)
    x = BasicConv2d(32, 3, strides=2, precision=p, name="Conv2d_1a_3x3")(x)  # 149x149x32
    x = BasicConv2d(32, 3, precision=p, name="Conv2d_2a_3x3")(x)  # 147x147x32
    x = BasicConv2d(64, 3, padding=1, precision=p, name="Conv2d_2b_3x3")(x)  # 147x147x64
    x = _max_pool_3x3_s2(x)  # 73x73x64
    x = BasicConv2d(80, 1, precision=p, name="Conv2d_3b_1x1")(x)  # 73x73x80
    x = BasicConv2d(192, 3, precision=p, name="Conv2d_4a_3x3")(x)  # 71x71x192
    x = _max_pool_3x3_s2(x)  # 35x35x192
    x = InceptionA(32, precision=p, name="Mixed_5b")(x)  # 35x35x256
    x = InceptionA(64, precision=p, name="Mixed_5c")(x)  # 35x35x288
    x = InceptionA(64, precision=p, name="Mixed_5d")(x)  # 35x35x288
    x = InceptionB(precision=p, name="Mixed_6a")(x)  # 17x17x768
    x = InceptionC(128, precision=p, name="Mixed_6b")(x)
    x = InceptionC(160, precision=p, name="Mixed_6c")(x)
    x = InceptionC(160, precision=p, name="Mixed_6d")(x)
    x = InceptionC(192, precision=p, name="Mixed_6e")(x)  # 17x17x768
    x = InceptionD(precision=p, name="Mixed_7a")(x)  # 8x8x1280
    x = InceptionE("avg", precision=p, name="Mixed_7b")(x)  # 8x8x2048
    x = InceptionE("max", precision=p, name="Mixed_7c")(x)  # 8x8x2048
    pool = jnp.mean(x, axis=(1, 2))  # [N, 2048] (adaptive avg pool to 1x1)
    if not logits:
      return pool
    out = nn.Dense(NUM_CLASSES, precision=p, name="fc")(pool)  # [N, 1008]
    return pool, out
