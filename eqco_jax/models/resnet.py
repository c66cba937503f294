"""ResNet backbones (torchvision v1.5 layout) returning pooled features.

Layer names follow torchvision (``conv1``, ``bn1``, ``layer2_0/conv1``,
``layer2_0/downsample_conv``...) so that weights map one to one onto
torchvision's ``state_dict`` (:mod:`eqco_jax.models.torchvision_layout`).
Params are float32; ``dtype`` is the compute dtype (e.g. bfloat16); BatchNorm
statistics and the pooled output are float32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from eqco_jax.models.batch_norm import BatchNorm

ModuleDef = Any
Dtype = Any

def conv_kernel_init(key: jax.Array, shape: tuple[int, ...],
                     dtype: Dtype = jnp.float32) -> jax.Array:
  """torchvision's ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``.

  A kernel ``[kh, kw, in, out]`` ~ N(0, 2 / (kh * kw * out)), bit for bit
  ``nn.initializers.variance_scaling(2.0, "fan_out", "normal")``. Drawn as a
  flat vector and reshaped (the same numbers): XLA compiles JAX's threefry
  for a rank-4 shape about 8 times slower on a CPU.
  """
  fan_out = math.prod(shape[:-2]) * shape[-1]
  flat = jax.random.normal(key, (math.prod(shape),), dtype)
  return (flat * jnp.sqrt(jnp.asarray(2.0 / fan_out, dtype))).reshape(shape)


class BasicBlock(nn.Module):
  """Two 3x3 convs: [N, H, W, Cin] -> [N, H/s, W/s, features]."""
  features: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  zero_init_residual: bool = True
  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x: jax.Array, bn_order: jax.Array | None = None
               ) -> jax.Array:
    last_scale_init = (nn.initializers.zeros if self.zero_init_residual
                       else nn.initializers.ones)
    y = self.conv(self.features, (3, 3), self.strides, padding=1,
                  name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y, order=bn_order))
    y = self.conv(self.features, (3, 3), 1, padding=1, name="conv2")(y)
    y = self.norm(scale_init=last_scale_init, name="bn2")(y, order=bn_order)
    return nn.relu(_shortcut(self, x, y.shape[-1], bn_order) + y)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 convs: [N, H, W, Cin] -> [N, H/s, W/s, 4F]."""
  features: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  zero_init_residual: bool = True
  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: jax.Array, bn_order: jax.Array | None = None
               ) -> jax.Array:
    last_scale_init = (nn.initializers.zeros if self.zero_init_residual
                       else nn.initializers.ones)
    y = self.conv(self.features, (1, 1), 1, padding=0, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y, order=bn_order))
    y = self.conv(self.features, (3, 3), self.strides, padding=1,
                  name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y, order=bn_order))
    y = self.conv(self.features * self.expansion, (1, 1), 1, padding=0,
                  name="conv3")(y)
    y = self.norm(scale_init=last_scale_init, name="bn3")(y, order=bn_order)
    return nn.relu(_shortcut(self, x, y.shape[-1], bn_order) + y)


def _shortcut(block: BasicBlock | Bottleneck, x: jax.Array,
              out_features: int, bn_order: jax.Array | None) -> jax.Array:
  """Identity, or strided 1x1 conv + BN when the shape changes."""
  if block.strides == 1 and x.shape[-1] == out_features:
    return x
  x = block.conv(out_features, (1, 1), block.strides, padding=0,
                 name="downsample_conv")(x)
  return block.norm(name="downsample_bn")(x, order=bn_order)


# name -> (blocks per stage, block type).
LAYOUTS: dict[str, tuple[tuple[int, ...], type[nn.Module]]] = {
    "resnet10": ((1, 1, 1, 1), BasicBlock),
    "resnet18": ((2, 2, 2, 2), BasicBlock),
    "resnet34": ((3, 4, 6, 3), BasicBlock),
    "resnet50": ((3, 4, 6, 3), Bottleneck),
    "resnet101": ((3, 4, 23, 3), Bottleneck),
}
MODELS = tuple(LAYOUTS)


class ResNet(nn.Module):
  """ResNet trunk + global average pool: [N, H, W, 3] -> [N, num_features].

  Attributes:
    stage_sizes: residual blocks in each of the stages.
    block_cls: BasicBlock or Bottleneck.
    width: channels of the first stage (64 in the standard nets); stage i has
      width * 2**i (times the block expansion at its output).
    small_image: 3x3/1 stem conv and no max-pool (CIFAR-sized inputs) instead
      of the ImageNet 7x7/2 conv + 3x3/2 max-pool.
    zero_init_residual: start each residual branch's last BN scale at zero.
    bn_group_size: examples per BatchNorm statistics group (None: the batch).
    bn_momentum: decay of the BN running statistics.
    bn_epsilon: BN epsilon.
    dtype: compute dtype; params stay float32.
    remat: recompute each block's activations in the backward pass instead
      of storing them (less memory for a larger per-device batch).
  """
  stage_sizes: Sequence[int]
  block_cls: type[nn.Module]
  width: int = 64
  small_image: bool = False
  zero_init_residual: bool = True
  bn_group_size: int | None = None
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  remat: bool = False

  @property
  def num_features(self) -> int:
    """Size C of the pooled features: 8 * width * expansion."""
    return 2 ** (len(self.stage_sizes) - 1) * self.width * (
        self.block_cls.expansion)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool,
               bn_order: jax.Array | None = None) -> jax.Array:
    """Returns float32 features [N, C] of images x: [N, H, W, 3].

    ``bn_order`` (int [N], a permutation) forms BatchNorm groups from runs of
    ``bn_group_size`` in that order (Shuffle BN); None: consecutive runs.
    """
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             param_dtype=jnp.float32,
                             kernel_init=conv_kernel_init)
    norm = functools.partial(BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum,
                             epsilon=self.bn_epsilon,
                             group_size=self.bn_group_size, dtype=self.dtype)
    x = jnp.asarray(x, self.dtype)
    if self.small_image:
      x = conv(self.width, (3, 3), 1, padding=1, name="conv1")(x)
    else:
      x = conv(self.width, (7, 7), 2, padding=3, name="conv1")(x)
    x = nn.relu(norm(name="bn1")(x, order=bn_order))
    if not self.small_image:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    block_cls = nn.remat(self.block_cls) if self.remat else self.block_cls
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        x = block_cls(
            features=self.width * 2 ** i,
            conv=conv,
            norm=norm,
            strides=2 if i > 0 and j == 0 else 1,
            zero_init_residual=self.zero_init_residual,
            name=f"layer{i + 1}_{j}")(x, bn_order)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def create_backbone(model: str, *, width: int = 64, small_image: bool = False,
                    bn_group_size: int | None = None,
                    zero_init_residual: bool = True,
                    dtype: Dtype = jnp.float32, remat: bool = False) -> ResNet:
  """Returns the ResNet named ``model`` (one of MODELS)."""
  if model not in LAYOUTS:
    raise ValueError(f"Unknown model {model!r}; choose one of {MODELS}.")
  stage_sizes, block_cls = LAYOUTS[model]
  return ResNet(stage_sizes=stage_sizes, block_cls=block_cls, width=width,
                small_image=small_image, zero_init_residual=zero_init_residual,
                bn_group_size=bn_group_size, dtype=dtype, remat=remat)
