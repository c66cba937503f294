"""Batch normalisation over the global batch or over groups of examples.

With ``group_size=None`` the statistics are taken over the whole batch. Under
``jax.jit`` on a batch sharded over the mesh that batch is the global one, so
this is synchronised BatchNorm with no ``axis_name``. With ``group_size=g`` each
run of ``g`` consecutive examples is normalised by its own statistics, which is
MoCo's per-GPU BatchNorm (and Shuffle BN's inner step) on any device count.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any
Initializer = Any


def _check_group_size(batch_size: int, group_size: int) -> None:
  """Raises ValueError unless ``group_size`` splits the batch evenly."""
  if group_size <= 0 or batch_size % group_size:
    raise ValueError(
        f"BatchNorm group_size={group_size} must be a positive divisor of the "
        f"batch size {batch_size}; choose a group size that divides the batch.")


def _grouped(x: jax.Array, group_size: int) -> jax.Array:
  """[N, ..., C] -> float32 [N/g, g, ..., C]."""
  _check_group_size(x.shape[0], group_size)
  return x.astype(jnp.float32).reshape(
      (x.shape[0] // group_size, group_size) + x.shape[1:])


def group_moments(x: jax.Array, group_size: int) -> tuple[jax.Array, jax.Array]:
  """Per-group mean and biased variance in float32.

  Args:
    x: [N, ..., C] input, any float dtype.
    group_size: g, a divisor of N.

  Returns:
    (mean, var), each [N/g, C] float32.
  """
  x = _grouped(x, group_size)
  axes = tuple(range(1, x.ndim - 1))
  mean = jnp.mean(x, axis=axes)
  centred = x - jnp.expand_dims(mean, axes)
  var = jnp.mean(jnp.square(centred), axis=axes)
  return mean, var


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
  def __call__(self, x: jax.Array,
               use_running_average: bool | None = None) -> jax.Array:
    """Normalises x: [N, ..., C] -> [N, ..., C]."""
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    features = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean",
                            lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var",
                           lambda: jnp.ones((features,), jnp.float32))

    if use_running_average:
      group_size = x.shape[0]
      mean, var = ra_mean.value[None], ra_var.value[None]  # [1, C]
    else:
      group_size = x.shape[0] if self.group_size is None else self.group_size
      mean, var = group_moments(x, group_size)  # [G, C]
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * jnp.mean(mean, axis=0)
        ra_var.value = m * ra_var.value + (1 - m) * jnp.mean(var, axis=0)

    mul = lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      scale = self.param("scale", self.scale_init, (features,),
                         self.param_dtype)
      mul = mul * scale.astype(jnp.float32)

    # x viewed as [G, g, ..., C]; statistics [G, C] -> [G, 1, ..., 1, C].
    grouped = _grouped(x, group_size)
    expand = (slice(None),) + (None,) * (grouped.ndim - 2) + (slice(None),)
    y = (grouped - mean[expand]) * mul[expand]
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (features,), self.param_dtype)
      y = y + bias.astype(jnp.float32)
    dtype = self.dtype
    if dtype is None:
      dtype = jnp.result_type(x.dtype, self.param_dtype)
    return y.reshape(x.shape).astype(dtype)
