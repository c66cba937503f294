"""ResNet backbones (torchvision v1.5 layout) returning pooled features.

Layer names follow torchvision (``conv1``, ``bn1``, ``layer2_0/conv1``,
``layer2_0/downsample_conv``...) so that weights map one to one onto
torchvision's ``state_dict`` (:mod:`eqco_jax.program.torchvision.layout`).
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

from eqco_jax.core.models.batch_norm import batch_norm_layer
from eqco_jax.core.types import Dtype

ModuleDef = Any
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


class ResidualBlock(nn.Module):
  """Convs, each followed by BN (ReLU between them), plus the shortcut:
  [N, H, W, Cin] -> [N, H/s, W/s, features * expansion].

  A subclass says its convs' kernel sizes (``KERNELS``), which one carries
  the stride (``STRIDED``, torchvision v1.5) and how much wider its output is
  than ``features`` (``expansion``). Layers are named ``conv{i}``/``bn{i}``
  as in torchvision; the last BN's scale starts at zero when
  ``zero_init_residual``.
  """
  features: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  zero_init_residual: bool = True
  KERNELS: ClassVar[tuple[int, ...]] = ()
  STRIDED: ClassVar[int] = 0
  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x: jax.Array, bn_order: jax.Array | None = None
               ) -> jax.Array:
    y, last = x, len(self.KERNELS) - 1
    for i, kernel in enumerate(self.KERNELS):
      width = self.features * (self.expansion if i == last else 1)
      y = self.conv(width, (kernel, kernel),
                    self.strides if i == self.STRIDED else 1,
                    padding=kernel // 2, name=f"conv{i + 1}")(y)
      zero_scale = i == last and self.zero_init_residual
      y = self.norm(scale_init=(nn.initializers.zeros if zero_scale
                                else nn.initializers.ones),
                    name=f"bn{i + 1}")(y, order=bn_order)
      if i < last:
        y = nn.relu(y)
    return nn.relu(self._shortcut(x, y.shape[-1], bn_order) + y)

  @nn.nowrap
  def _shortcut(self, x: jax.Array, out_features: int,
                bn_order: jax.Array | None) -> jax.Array:
    """Identity, or strided 1x1 conv + BN when the shape changes."""
    if self.strides == 1 and x.shape[-1] == out_features:
      return x
    x = self.conv(out_features, (1, 1), self.strides, padding=0,
                  name="downsample_conv")(x)
    return self.norm(name="downsample_bn")(x, order=bn_order)


class BasicBlock(ResidualBlock):
  """Two 3x3 convs (ResNet-10 to 34)."""
  KERNELS: ClassVar[tuple[int, ...]] = (3, 3)
  STRIDED: ClassVar[int] = 0
  expansion: ClassVar[int] = 1


class Bottleneck(ResidualBlock):
  """1x1 -> 3x3 (strided) -> 1x1 convs, 4x wider output (ResNet-50, 101)."""
  KERNELS: ClassVar[tuple[int, ...]] = (1, 3, 1)
  STRIDED: ClassVar[int] = 1
  expansion: ClassVar[int] = 4


# config.model -> (blocks per stage, block type).
LAYOUTS: dict[str, tuple[tuple[int, ...], type[ResidualBlock]]] = {
    "resnet10": ((1, 1, 1, 1), BasicBlock),
    "resnet18": ((2, 2, 2, 2), BasicBlock),
    "resnet34": ((3, 4, 6, 3), BasicBlock),
    "resnet50": ((3, 4, 6, 3), Bottleneck),
    "resnet101": ((3, 4, 23, 3), Bottleneck),
}
# config.dtype -> compute dtype (params and BN statistics stay float32).
DTYPES: dict[str, Dtype] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ResNet(nn.Module):
  """ResNet trunk + global average pool: [N, H, W, 3] -> [N, num_features].

  Attributes:
    stage_sizes: residual blocks in each of the stages.
    block_cls: BasicBlock or Bottleneck.
    width: channels of the first stage (64 in the standard nets); stage i has
      width * 2**i (times the block expansion at its output).
    small_image_stem: 3x3/1 stem conv and no max-pool (CIFAR-sized inputs)
      instead of the ImageNet 7x7/2 conv + 3x3/2 max-pool.
    zero_init_residual: start each residual branch's last BN scale at zero.
    bn_group_size: examples per BatchNorm statistics group (None: the batch).
    bn_momentum: decay of the BN running statistics.
    bn_epsilon: BN epsilon.
    dtype: compute dtype; params stay float32.
    remat: recompute each block's activations in the backward pass instead
      of storing them (less memory for a larger per-device batch).
  """
  stage_sizes: Sequence[int]
  block_cls: type[ResidualBlock]
  width: int = 64
  small_image_stem: bool = False
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
    norm = batch_norm_layer(train, group_size=self.bn_group_size,
                            dtype=self.dtype, momentum=self.bn_momentum,
                            epsilon=self.bn_epsilon)
    x = jnp.asarray(x, self.dtype)
    if self.small_image_stem:
      x = conv(self.width, (3, 3), 1, padding=1, name="conv1")(x)
    else:
      x = conv(self.width, (7, 7), 2, padding=3, name="conv1")(x)
    x = nn.relu(norm(name="bn1")(x, order=bn_order))
    if not self.small_image_stem:
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


def create_backbone(model: str, *, width: int = 64,
                    small_image_stem: bool = False,
                    bn_group_size: int | None = None,
                    zero_init_residual: bool = True,
                    dtype: Dtype = jnp.float32, remat: bool = False) -> ResNet:
  """Returns the ResNet named ``model`` (a key of LAYOUTS)."""
  if model not in LAYOUTS:
    raise ValueError(f"Unknown model {model!r}; choose one of "
                     f"{tuple(LAYOUTS)}.")
  stage_sizes, block_cls = LAYOUTS[model]
  return ResNet(stage_sizes=stage_sizes, block_cls=block_cls, width=width,
                small_image_stem=small_image_stem,
                zero_init_residual=zero_init_residual,
                bn_group_size=bn_group_size, dtype=dtype, remat=remat)
