"""Projection heads (MoCo v2, SiMo) and the linear-evaluation classifier.

Heads map backbone features [N, C] to un-normalised embeddings [N, out_dim];
the encoder L2-normalises them. Dense kernels start like PyTorch's nn.Linear
(uniform, bound 1/sqrt(fan_in)); biases start at zero.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from eqco_jax.models.batch_norm import BatchNorm

Dtype = Any

HEADS = ("simo", "mocov2")

# PyTorch nn.Linear weight default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
dense_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in",
                                                     "uniform")


class MoCoV2Head(nn.Module):
  """Dense(hidden, bias) -> ReLU -> Dense(out, bias): [N, C] -> [N, out_dim].

  Attributes:
    hidden_dim: width of the hidden layer.
    out_dim: embedding size.
    dtype: compute dtype; params stay float32.
  """
  hidden_dim: int = 2048
  out_dim: int = 128
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool,
               bn_order: jax.Array | None = None) -> jax.Array:
    """Projects features x: [N, C]; ``train`` and ``bn_order`` are unused
    (no BN)."""
    del train, bn_order
    dense = functools.partial(nn.Dense, use_bias=True, dtype=self.dtype,
                              param_dtype=jnp.float32,
                              kernel_init=dense_kernel_init)
    x = nn.relu(dense(self.hidden_dim, name="fc1")(x))
    return dense(self.out_dim, name="fc2")(x)


class SiMoHead(nn.Module):
  """Dense -> BN -> ReLU -> Dense -> BN (no biases): [N, C] -> [N, out_dim].

  Attributes:
    hidden_dim: width of the hidden layer.
    out_dim: embedding size.
    bn_group_size: examples per BatchNorm statistics group (None: the batch).
    bn_momentum: decay of the BN running statistics.
    bn_epsilon: BN epsilon.
    dtype: compute dtype; params stay float32.
  """
  hidden_dim: int = 2048
  out_dim: int = 128
  bn_group_size: int | None = None
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool,
               bn_order: jax.Array | None = None) -> jax.Array:
    """Projects features x: [N, C] (BN in batch mode when ``train``; groups
    formed in ``bn_order`` as in the backbone)."""
    dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype,
                              param_dtype=jnp.float32,
                              kernel_init=dense_kernel_init)
    norm = functools.partial(BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum,
                             epsilon=self.bn_epsilon,
                             group_size=self.bn_group_size, dtype=self.dtype)
    x = dense(self.hidden_dim, name="fc1")(x)
    x = nn.relu(norm(name="bn1")(x, order=bn_order))
    return norm(name="bn2")(dense(self.out_dim, name="fc2")(x), order=bn_order)


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
                dtype: Dtype = jnp.float32) -> MoCoV2Head | SiMoHead:
  """Returns the projection head named ``head`` (one of HEADS)."""
  if head == "simo":
    return SiMoHead(hidden_dim=hidden_dim, out_dim=out_dim,
                    bn_group_size=bn_group_size, dtype=dtype)
  if head == "mocov2":
    return MoCoV2Head(hidden_dim=hidden_dim, out_dim=out_dim, dtype=dtype)
  raise ValueError(f"Unknown head {head!r}; choose one of {HEADS}.")
