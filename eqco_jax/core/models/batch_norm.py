"""Batch normalisation over the global batch or over groups of examples.

With ``group_size=None`` the statistics are taken over the whole batch. Under
``jax.jit`` on a batch sharded over the mesh that batch is the global one, so
this is synchronised BatchNorm with no ``axis_name``. With ``group_size=g`` the
examples fall into groups of ``g`` normalised by their own statistics: runs of
``g`` consecutive examples (MoCo's per-GPU BatchNorm, on any device count), or,
given ``order`` at call time, the runs of ``g`` in that order (Shuffle BN
without moving a single image).

Statistics cross devices once per layer: each example's shifted sums
``sum(x - ref)`` and ``sum((x - ref)^2)`` over its pixels stay on its device,
and one reduction over the batch gives both moments of every group. ``ref``
is the layer's running mean, which every device holds, so the variance does
not cancel catastrophically in float32 once the running mean has moved
towards the data.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from eqco_jax.core.types import Dtype

Initializer = Any
_HIGHEST = lax.Precision.HIGHEST


def _check_group_size(batch_size: int, group_size: int) -> None:
  """Raises ValueError unless ``group_size`` splits the batch evenly."""
  if group_size <= 0 or batch_size % group_size:
    raise ValueError(
        f"BatchNorm group_size={group_size} must be a positive divisor of the "
        f"batch size {batch_size}; choose a group size that divides the batch.")


def group_membership(batch_size: int, group_size: int,
                     order: jax.Array | None = None) -> jax.Array | None:
  """float32 one-hot ``[N, G]`` of each example's group, None for one group.

  Example i belongs to group ``order[i] // group_size`` (``order`` a
  permutation, None: ``arange(N)``, consecutive runs).
  """
  _check_group_size(batch_size, group_size)
  num_groups = batch_size // group_size
  if num_groups == 1:
    return None
  position = jnp.arange(batch_size) if order is None else order
  return jax.nn.one_hot(position // group_size, num_groups, dtype=jnp.float32)


def group_moments(x: jax.Array, membership: jax.Array | None,
                  reference: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """Per-group mean and biased variance in float32, from one reduction.

  Args:
    x: [N, ..., C] input, any float dtype.
    membership: [N, G] one-hot groups (:func:`group_membership`); None for
      the whole batch as one group.
    reference: [C] per-channel shift (no gradient flows into it), near the
      mean; None: zero.

  Returns:
    (mean, var), each [G, C] float32.
  """
  axes = tuple(range(1, x.ndim - 1))
  shift = (jnp.zeros((x.shape[-1],), jnp.float32) if reference is None
           else lax.stop_gradient(reference.astype(jnp.float32)))
  d = x.astype(jnp.float32) - shift
  # [N, 2, C]: each example's sums over its pixels, local to its device.
  sums = jnp.stack([jnp.sum(d, axis=axes), jnp.sum(d * d, axis=axes)], 1)
  if membership is None:
    totals = jnp.sum(sums, axis=0)[None]  # [1, 2, C]
    count = math.prod(x.shape[:-1])
  else:
    totals = jnp.einsum("ng,nkc->gkc", membership, sums, precision=_HIGHEST)
    count = math.prod(x.shape[:-1]) // membership.shape[1]
  shifted_mean, shifted_square = totals[:, 0] / count, totals[:, 1] / count
  var = jnp.maximum(shifted_square - jnp.square(shifted_mean), 0.0)
  return shift + shifted_mean, var


class BatchNorm(nn.Module):
  """BatchNorm over the feature (last) axis with optional per-group statistics.

  Variables match ``flax.linen.BatchNorm``: ``params/{scale,bias}`` and
  ``batch_stats/{mean,var}`` (float32, biased variance). The running statistics
  move by ``momentum`` towards the mean over groups of the group means and
  group variances; they are not updated during ``init``.

  Attributes:
    use_running_average: normalise with the running statistics (eval mode);
      may instead be given at call time.
    momentum: decay of the running statistics (0.9 = PyTorch's 0.1).
    epsilon: added to the variance.
    group_size: examples per statistics group; None means the whole batch.
      The groups are consecutive runs, or runs in the ``order`` given at
      call time.
    dtype: dtype of the output (default: that of the input promoted with the
      float32 params); statistics and normalisation run in float32.
    param_dtype: dtype of scale and bias.
    use_bias: learn a shift.
    use_scale: learn a scale.
    scale_init: initializer of the scale (zeros for a residual branch's last
      BN).
    bias_init: initializer of the bias.
  """
  use_running_average: bool | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  group_size: int | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  scale_init: Initializer = nn.initializers.ones
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None,
               order: jax.Array | None = None) -> jax.Array:
    """Normalises x: [N, ..., C] -> [N, ..., C].

    ``order`` (int [N], a permutation) forms the groups from runs of
    ``group_size`` in that order instead of consecutive examples.
    """
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    features = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean",
                            lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var",
                           lambda: jnp.ones((features,), jnp.float32))

    membership = None
    if use_running_average:
      mean, var = ra_mean.value[None], ra_var.value[None]  # [1, C]
    else:
      group_size = x.shape[0] if self.group_size is None else self.group_size
      membership = group_membership(x.shape[0], group_size, order)
      mean, var = group_moments(x, membership, ra_mean.value)  # [G, C]
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * jnp.mean(mean, axis=0)
        ra_var.value = m * ra_var.value + (1 - m) * jnp.mean(var, axis=0)

    mul = lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      scale = self.param("scale", self.scale_init, (features,),
                         self.param_dtype)
      mul = mul * scale.astype(jnp.float32)
    if membership is not None:  # each example's statistics [N, C], local
      mean, mul = (jnp.matmul(membership, v, precision=_HIGHEST)
                   for v in (mean, mul))
    expand = (slice(None),) + (None,) * (x.ndim - 2) + (slice(None),)
    y = (x.astype(jnp.float32) - mean[expand]) * mul[expand]
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (features,), self.param_dtype)
      y = y + bias.astype(jnp.float32)
    dtype = self.dtype
    if dtype is None:
      dtype = jnp.result_type(x.dtype, self.param_dtype)
    return y.astype(dtype)


def batch_norm_layer(train: bool, *, group_size: int | None, dtype: Dtype,
                     momentum: float = 0.9, epsilon: float = 1e-5
                     ) -> functools.partial:
  """The BatchNorm every layer of a backbone or head shares: batch statistics
  (per group of ``group_size``, None: the whole batch) when ``train``, else
  the running statistics. Call it with ``name=`` (and ``scale_init=``)."""
  return functools.partial(BatchNorm, use_running_average=not train,
                           momentum=momentum, epsilon=epsilon,
                           group_size=group_size, dtype=dtype)
