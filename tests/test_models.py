"""Tests of eqco_jax.models: ResNets, BatchNorm (global and grouped), heads."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqco_jax import models

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
  backbone = models.create_backbone(name, width=width, small_image=True)
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
                           small_image=True, zero_init_residual=zero_init)
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


def _bn_pair(x, group_size):
  """Runs ours and flax's BN (train step, then eval) with the same params."""
  ours = models.BatchNorm(group_size=group_size)
  ref = nn.BatchNorm(momentum=0.9, epsilon=1e-5)
  variables = ref.init(KEY, x, use_running_average=False)
  k1, k2 = jax.random.split(jax.random.key(1))
  c = x.shape[-1]
  variables = {
      "params": {"scale": 1 + jax.random.normal(k1, (c,)),
                 "bias": jax.random.normal(k2, (c,))},
      "batch_stats": variables["batch_stats"],
  }
  results = []
  for module in (ours, ref):
    y, state = module.apply(variables, x, use_running_average=False,
                            mutable=["batch_stats"])
    y_eval = module.apply({**variables, **state}, 0.5 * x,
                          use_running_average=True)
    results.append((y, state["batch_stats"], y_eval))
  return results


@pytest.mark.parametrize("group_size", [None, 6])
def test_batch_norm_matches_flax(group_size):
  x = 3.0 + 2.0 * jax.random.normal(KEY, (6, 5, 4, 7))
  (y, stats, y_eval), (y_ref, stats_ref, y_eval_ref) = _bn_pair(x, group_size)
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(y_eval, y_eval_ref, atol=1e-5, rtol=1e-5)
  for k in ("mean", "var"):
    np.testing.assert_allclose(stats[k], stats_ref[k], atol=1e-5, rtol=1e-5)
  assert not np.allclose(stats["mean"], 0.0)  # Stats really moved.


def _two_group_batch():
  """[8, 3, 3, 4] batch: two groups of 4 from very different distributions."""
  k1, k2 = jax.random.split(KEY)
  a = jax.random.normal(k1, (4, 3, 3, 4))
  b = 5.0 + 3.0 * jax.random.normal(k2, (4, 3, 3, 4))
  return jnp.concatenate([a, b])


def test_group_batch_norm_normalises_each_group():
  x = _two_group_batch()
  bn = models.BatchNorm(group_size=4)
  variables = bn.init(KEY, x, use_running_average=False)
  y, state = bn.apply(variables, x, use_running_average=False,
                      mutable=["batch_stats"])
  for group in (y[:4], y[4:]):
    np.testing.assert_allclose(group.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(group.var(axis=(0, 1, 2)), 1.0, atol=1e-3)
  y_global = models.BatchNorm().apply(variables, x, use_running_average=False,
                                      mutable=["batch_stats"])[0]
  assert np.abs(np.asarray(y_global - y)).max() > 0.5

  # Running stats move towards the mean over groups of the group stats.
  xs = np.asarray(x).reshape(2, 4 * 3 * 3, 4)
  group_mean = xs.mean(axis=1).mean(axis=0)
  group_var = xs.var(axis=1).mean(axis=0)
  np.testing.assert_allclose(state["batch_stats"]["mean"], 0.1 * group_mean,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state["batch_stats"]["var"],
                             0.9 + 0.1 * group_var, rtol=1e-5)


def test_group_size_must_divide_batch():
  bn = models.BatchNorm(group_size=3)
  x = jnp.ones((8, 4))
  with pytest.raises(ValueError, match="group_size=3"):
    bn.init(KEY, x, use_running_average=False)


def test_heads():
  x = jax.random.normal(KEY, (6, 32))
  simo = models.SiMoHead(hidden_dim=16, out_dim=8)
  moco = models.MoCoV2Head(hidden_dim=16, out_dim=8)
  simo_vars = simo.init(KEY, x, train=True)
  moco_vars = moco.init(KEY, x, train=True)
  assert simo.apply(simo_vars, x, train=False).shape == (6, 8)
  assert moco.apply(moco_vars, x, train=False).shape == (6, 8)

  sp = simo_vars["params"]
  assert set(sp) == {"fc1", "bn1", "fc2", "bn2"}
  assert set(sp["fc1"]) == {"kernel"} and set(sp["fc2"]) == {"kernel"}
  assert sp["fc1"]["kernel"].shape == (32, 16)
  assert set(simo_vars["batch_stats"]) == {"bn1", "bn2"}
  mp = moco_vars["params"]
  assert set(mp) == {"fc1", "fc2"}
  assert set(mp["fc1"]) == {"kernel", "bias"}
  assert mp["fc2"]["bias"].shape == (8,)
  assert "batch_stats" not in moco_vars

  # Output is not L2-normalised by the head.
  y = moco.apply(moco_vars, 10.0 * x, train=False)
  assert not np.allclose(jnp.linalg.norm(y, axis=-1), 1.0, atol=1e-2)

  classifier = models.LinearClassifier(num_classes=10)
  p = classifier.init(KEY, jnp.ones((2, 512)))["params"]["fc"]
  np.testing.assert_array_equal(p["bias"], 0.0)
  assert abs(float(p["kernel"].std()) - 0.01) < 1e-3


def test_create_rejects_unknown_names():
  with pytest.raises(ValueError, match="resnet51.*resnet50"):
    models.create_backbone("resnet51")
  with pytest.raises(ValueError, match="byol.*simo"):
    models.create_encoder("resnet18", "byol")
  assert models.MODELS == ("resnet10", "resnet18", "resnet34", "resnet50",
                           "resnet101")
  assert models.HEADS == ("simo", "mocov2")


def _tiny_encoder(head="simo", dtype=jnp.float32, **kwargs):
  return models.create_encoder("resnet10", head, width=8, small_image=True,
                               head_hidden_dim=16, head_out_dim=8, dtype=dtype,
                               **kwargs)


@pytest.fixture(scope="module")
def tiny():
  """A tiny float32 SiMo encoder, its variables and a batch."""
  encoder = _tiny_encoder()
  x = jax.random.normal(jax.random.key(2), (8, 8, 8, 3))
  variables = encoder.init(KEY, x, train=False)
  return encoder, variables, x


def test_encoder_outputs_and_train_mode(tiny):
  encoder, variables, x = tiny
  out, state = encoder.apply(variables, x, train=True,
                             mutable=["batch_stats"])
  assert out["features"].shape == (8, 64)
  assert out["embedding"].shape == (8, 8)
  assert out["features"].dtype == out["embedding"].dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(out["embedding"], axis=-1), 1.0,
                             rtol=1e-5)
  assert set(variables["params"]) == {"backbone", "head"}
  # Train mode moves the running statistics of backbone and head.
  for part in ("backbone", "head"):
    before = jax.tree.leaves(variables["batch_stats"][part])
    after = jax.tree.leaves(state["batch_stats"][part])
    assert any(not np.allclose(a, b) for a, b in zip(before, after))


def test_eval_mode_keeps_batch_stats(tiny):
  encoder, variables, x = tiny
  out, state = encoder.apply(variables, x, train=False,
                             mutable=["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, state["batch_stats"],
               variables["batch_stats"])
  # Eval output uses running stats (init: mean 0, var 1), not batch stats.
  out_train = encoder.apply(variables, x, train=True,
                            mutable=["batch_stats"])[0]
  assert not np.allclose(out["features"], out_train["features"], atol=1e-3)


def test_mocov2_encoder(tiny):
  _, simo_variables, x = tiny
  encoder = _tiny_encoder("mocov2")
  variables = encoder.init(KEY, x, train=False)
  assert "head" not in variables["batch_stats"]
  # Same backbone variables as the SiMo encoder: only the head differs.
  assert (jax.tree.structure(variables["params"]["backbone"]) ==
          jax.tree.structure(simo_variables["params"]["backbone"]))
  out, _ = encoder.apply(variables, x, train=True, mutable=["batch_stats"])
  assert out["embedding"].shape == (8, 8)
  np.testing.assert_allclose(jnp.linalg.norm(out["embedding"], axis=-1), 1.0,
                             rtol=1e-5)


def test_bfloat16_compute(tiny):
  encoder, variables, x = tiny
  bf16 = _tiny_encoder(dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32
             for p in jax.tree.leaves(bf16.init(KEY, x, train=False)))
  out, state = bf16.apply(variables, x, train=True, mutable=["batch_stats"])
  ref = encoder.apply(variables, x, train=True, mutable=["batch_stats"])[0]
  assert out["features"].dtype == out["embedding"].dtype == jnp.float32
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(state))
  np.testing.assert_allclose(out["features"], ref["features"], rtol=0.05,
                             atol=0.05)
  assert not np.array_equal(out["features"], ref["features"])  # Really bf16.
  np.testing.assert_allclose(out["embedding"], ref["embedding"], atol=0.05)


@pytest.mark.parametrize("shape", [(3, 3, 16, 16), (7, 7, 3, 64),
                                   (1, 1, 64, 256)])
def test_conv_init_is_torchvisions_kaiming_fan_out_bit_for_bit(shape):
  from eqco_jax.models.resnet import conv_kernel_init
  reference = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
  np.testing.assert_array_equal(conv_kernel_init(KEY, shape),
                                reference(KEY, shape))
  fan_out = np.prod(shape[:-2]) * shape[-1]
  assert abs(np.std(conv_kernel_init(KEY, shape)) * np.sqrt(fan_out / 2)
             - 1) < 0.1


def test_remat_changes_memory_not_results():
  x = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
  plain = models.create_encoder("resnet10", "simo", width=4, small_image=True,
                                head_hidden_dim=16, head_out_dim=8)
  remat = models.create_encoder("resnet10", "simo", width=4, small_image=True,
                                head_hidden_dim=16, head_out_dim=8, remat=True)
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
