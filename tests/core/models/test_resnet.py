"""eqco_jax.core.models.resnet: torchvision's ResNets (parameter counts,
initialisation), the small-image stem, zero-init residuals, remat."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqco_jax.core import models


KEY = jax.random.key(0)


def _count(params) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def _abstract_init(module, shape):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  variables = jax.eval_shape(
      lambda x: module.init(KEY, x, train=False), x)
  out = jax.eval_shape(
      lambda v, x: module.apply(v, x, train=False), variables, x)
  return variables, out


@pytest.mark.parametrize("name,params,dim", [
    ("resnet50", 23_508_032, 2048),
    ("resnet18", 11_176_512, 512),  # torchvision 11,689,512 minus the fc.
])
def test_param_count_matches_torchvision(name, params, dim):
  backbone = models.create_backbone(name)
  variables, out = _abstract_init(backbone, (2, 224, 224, 3))
  assert _count(variables["params"]) == params
  assert out.shape == (2, dim) and out.dtype == jnp.float32
  assert backbone.num_features == dim
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))


@pytest.mark.parametrize("name,width,dim", [
    ("resnet10", 8, 64), ("resnet18", 16, 128), ("resnet50", 8, 256),
])
def test_small_stem_shapes(name, width, dim):
  backbone = models.create_backbone(name, width=width, small_image_stem=True)
  variables, out = _abstract_init(backbone, (3, 32, 32, 3))
  assert out.shape == (3, dim)
  assert backbone.num_features == dim
  stem = variables["params"]["conv1"]["kernel"]
  assert stem.shape == (3, 3, 3, width)
  # ImageNet stem on the same net: 7x7 conv.
  imagenet = models.create_backbone(name, width=width)
  variables, out = _abstract_init(imagenet, (3, 64, 64, 3))
  assert variables["params"]["conv1"]["kernel"].shape == (7, 7, 3, width)
  assert out.shape == (3, dim)


def _last_bn_scales(params):
  """Block name -> scale of the block's last BN (bn2 or bn3)."""
  scales = {}
  for name, block in params.items():
    if name.startswith("layer"):
      last = "bn3" if "bn3" in block else "bn2"
      scales[name] = block[last]["scale"]
  return scales


@pytest.mark.parametrize("block_cls", [models.BasicBlock, models.Bottleneck])
@pytest.mark.parametrize("zero_init", [True, False])
def test_zero_init_residual(block_cls, zero_init):
  backbone = models.ResNet(stage_sizes=(2, 1), block_cls=block_cls, width=4,
                           small_image_stem=True, zero_init_residual=zero_init)
  params = backbone.init(KEY, jnp.zeros((2, 4, 4, 3)), train=False)["params"]
  scales = _last_bn_scales(params)
  assert sorted(scales) == ["layer1_0", "layer1_1", "layer2_0"]
  for scale in scales.values():
    np.testing.assert_array_equal(scale, 0.0 if zero_init else 1.0)
  # Other BN scales start at one either way.
  np.testing.assert_array_equal(params["bn1"]["scale"], 1.0)
  np.testing.assert_array_equal(params["layer1_0"]["bn1"]["scale"], 1.0)
  np.testing.assert_array_equal(params["layer2_0"]["downsample_bn"]["scale"],
                                1.0)


@pytest.mark.parametrize("shape", [(3, 3, 16, 16), (7, 7, 3, 64),
                                   (1, 1, 64, 256)])
def test_conv_init_is_torchvisions_kaiming_fan_out_bit_for_bit(shape):
  from eqco_jax.core.models.resnet import conv_kernel_init
  reference = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
  np.testing.assert_array_equal(conv_kernel_init(KEY, shape),
                                reference(KEY, shape))
  fan_out = np.prod(shape[:-2]) * shape[-1]
  assert abs(np.std(conv_kernel_init(KEY, shape)) * np.sqrt(fan_out / 2)
             - 1) < 0.1


def test_remat_changes_memory_not_results():
  x = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
  plain = models.create_encoder("resnet10", "mlp_bn", width=4,
                                small_image_stem=True, head_hidden_dim=16,
                                head_out_dim=8)
  remat = models.create_encoder("resnet10", "mlp_bn", width=4,
                                small_image_stem=True, head_hidden_dim=16,
                                head_out_dim=8, remat=True)
  init = lambda module: jax.jit(functools.partial(module.init, train=False))(
      jax.random.key(1), x)
  variables = init(plain)
  assert jax.tree.structure(variables) == jax.tree.structure(init(remat))

  def loss(module, params):
    out, _ = module.apply({"params": params,
                           "batch_stats": variables["batch_stats"]}, x,
                          train=True, mutable=["batch_stats"])
    return jnp.sum(out["embedding"][:, 0]) + jnp.sum(out["features"])

  g_plain = jax.jit(jax.grad(lambda p: loss(plain, p)))(variables["params"])
  g_remat = jax.jit(jax.grad(lambda p: loss(remat, p)))(variables["params"])
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
