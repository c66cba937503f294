"""Projection heads and the linear-evaluation classifier.

A head maps backbone features [N, C] to un-normalised embeddings
[N, out_dim]; the encoder L2-normalises them. Dense kernels start like
PyTorch's nn.Linear (uniform, bound 1/sqrt(fan_in)); biases start at zero.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from eqco_jax.core.models.batch_norm import batch_norm_layer
from eqco_jax.core.types import Dtype

# PyTorch nn.Linear weight default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
dense_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in",
                                                     "uniform")


class ProjectionHead(nn.Module):
  """Two dense layers: [N, C] -> [N, out_dim].

  With ``batch_norm`` (SiMo's head): Dense -> BN -> ReLU -> Dense -> BN, no
  biases. Without (MoCo v2's): Dense -> ReLU -> Dense, with biases. Layers
  are named ``fc1``, ``bn1``, ``fc2``, ``bn2``.

  Attributes:
    hidden_dim: width of the hidden layer.
    out_dim: embedding size.
    batch_norm: BatchNorm after each dense layer (and no biases).
    bn_group_size: examples per BatchNorm statistics group (None: the batch).
    bn_momentum: decay of the BN running statistics.
    bn_epsilon: BN epsilon.
    dtype: compute dtype; params stay float32.
  """
  hidden_dim: int = 2048
  out_dim: int = 128
  batch_norm: bool = True
  bn_group_size: int | None = None
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool,
               bn_order: jax.Array | None = None) -> jax.Array:
    """Projects features x: [N, C]. BN (if any) uses batch statistics when
    ``train``, in groups formed in ``bn_order`` as in the backbone."""
    dense = functools.partial(nn.Dense, use_bias=not self.batch_norm,
                              dtype=self.dtype, param_dtype=jnp.float32,
                              kernel_init=dense_kernel_init)
    norm = batch_norm_layer(train, group_size=self.bn_group_size,
                            dtype=self.dtype, momentum=self.bn_momentum,
                            epsilon=self.bn_epsilon)
    for i, width in enumerate((self.hidden_dim, self.out_dim), start=1):
      x = dense(width, name=f"fc{i}")(x)
      if self.batch_norm:
        x = norm(name=f"bn{i}")(x, order=bn_order)
      if i == 1:
        x = nn.relu(x)
    return x


# config.head -> the head it names.
HEADS: dict[str, Callable[..., ProjectionHead]] = {
    "mlp_bn": functools.partial(ProjectionHead, batch_norm=True),  # SiMo
    "mlp": functools.partial(ProjectionHead, batch_norm=False),  # MoCo v2
}


class LinearClassifier(nn.Module):
  """Dense(num_classes), weight N(0, 0.01), bias 0: [N, C] -> [N, classes].

  Attributes:
    num_classes: number of output logits.
    dtype: compute dtype; params stay float32.
  """
  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Returns logits of features x: [N, C]."""
    return nn.Dense(self.num_classes, dtype=self.dtype,
                    param_dtype=jnp.float32,
                    kernel_init=nn.initializers.normal(0.01),
                    bias_init=nn.initializers.zeros, name="fc")(x)


def create_head(head: str, *, hidden_dim: int = 2048, out_dim: int = 128,
                bn_group_size: int | None = None,
                dtype: Dtype = jnp.float32) -> ProjectionHead:
  """Returns the projection head named ``head`` (a key of HEADS)."""
  if head not in HEADS:
    raise ValueError(f"Unknown head {head!r}; choose one of {tuple(HEADS)}.")
  return HEADS[head](hidden_dim=hidden_dim, out_dim=out_dim,
                     bn_group_size=bn_group_size, dtype=dtype)
