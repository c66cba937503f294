"""Options for speed at scale: bfloat16 compute, rematerialisation, LARS."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from eqco_jax import models
from eqco_jax import optim
from eqco_jax import sharding
from test_train_step import build, random_batch, tiny_config


def _run_steps(config, steps=3):
  mesh = sharding.make_mesh(jax.devices()[:1])
  state, step, _ = build(config, mesh)
  losses = []
  for i in range(steps):
    batch = jax.tree.map(lambda x: sharding.to_global_array(x, mesh),
                         random_batch(i))
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return jax.device_get(state), losses


def test_bfloat16_step_agrees_with_float32_and_keeps_float32_state():
  f32_state, f32_losses = _run_steps(tiny_config("simo"))
  bf16_state, bf16_losses = _run_steps(tiny_config("simo", dtype="bfloat16"))
  for leaf in jax.tree.leaves((bf16_state.params, bf16_state.batch_stats,
                               bf16_state.momentum_params,
                               bf16_state.opt_state)):
    assert leaf.dtype in (jnp.float32, jnp.int32)  # (int32: optax counts)
  np.testing.assert_allclose(bf16_losses, f32_losses, rtol=2e-2)
  diff = jax.tree.map(lambda a, b: np.abs(a - b).max(), bf16_state.params,
                      f32_state.params)
  assert max(jax.tree.leaves(diff)) < 2e-2
  assert max(jax.tree.leaves(diff)) > 0  # bf16 really was used


def test_remat_changes_memory_not_results():
  x = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
  plain = models.create_encoder("resnet18", "simo", width=4, small_image=True,
                                head_hidden_dim=16, head_out_dim=8)
  remat = models.create_encoder("resnet18", "simo", width=4, small_image=True,
                                head_hidden_dim=16, head_out_dim=8, remat=True)
  variables = plain.init(jax.random.key(1), x, train=False)
  assert jax.tree.structure(variables) == jax.tree.structure(
      remat.init(jax.random.key(1), x, train=False))

  def loss(module, params):
    out, _ = module.apply({"params": params,
                           "batch_stats": variables["batch_stats"]}, x,
                          train=True, mutable=["batch_stats"])
    return jnp.sum(out["embedding"][:, 0]) + jnp.sum(out["features"])

  g_plain = jax.grad(lambda p: loss(plain, p))(variables["params"])
  g_remat = jax.grad(lambda p: loss(remat, p))(variables["params"])
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_lars_adapts_kernels_only():
  config = ml_collections.ConfigDict(dict(
      optimizer="lars", weight_decay=0.1, sgd_momentum=0.0))
  tx = optim.create_optimizer(config, lambda step: 1.0)
  params = {"conv": {"kernel": jnp.full((3,), 2.0)},
            "bn": {"scale": jnp.full((3,), 2.0), "bias": jnp.full((3,), 2.0)}}
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # BN scale and bias: plain SGD step (no decay, no trust ratio): -1.
  np.testing.assert_allclose(updates["bn"]["scale"], -1.0)
  np.testing.assert_allclose(updates["bn"]["bias"], -1.0)
  # Kernel: decayed gradient 1 + 0.1 * 2 = 1.2 scaled by the trust ratio
  # 0.001 * ||p|| / ||g + wd p|| = 0.001 * 2 / 1.2.
  np.testing.assert_allclose(updates["conv"]["kernel"], -0.001 * 2.0,
                             rtol=1e-5)


def test_sgd_matches_pytorch_semantics():
  config = ml_collections.ConfigDict(dict(
      optimizer="sgd", weight_decay=0.1, sgd_momentum=0.9))
  tx = optim.create_optimizer(config, optax.constant_schedule(0.5))
  p = jnp.array([1.0, -2.0])
  state = tx.init(p)
  buf = np.zeros(2)
  p_ref = np.array([1.0, -2.0])
  for g in (np.array([0.3, 0.1]), np.array([-0.2, 0.4])):
    updates, state = tx.update(jnp.asarray(g), state, p)
    p = optax.apply_updates(p, updates)
    d = g + 0.1 * p_ref  # torch.optim.SGD: d_p = g + wd * p
    buf = 0.9 * buf + d  # buf = momentum * buf + d_p
    p_ref = p_ref - 0.5 * buf
  np.testing.assert_allclose(p, p_ref, rtol=1e-6)


def test_learning_rate_schedule_warmup_then_cosine():
  schedule = optim.learning_rate_schedule(0.03, 512, warmup_steps=10,
                                          total_steps=110)
  peak = 0.03 * 512 / 256
  np.testing.assert_allclose(schedule(0), 0.0)
  np.testing.assert_allclose(schedule(5), peak / 2, rtol=1e-5)
  np.testing.assert_allclose(schedule(10), peak, rtol=1e-5)
  np.testing.assert_allclose(schedule(60), peak / 2, rtol=1e-4)
  np.testing.assert_allclose(schedule(110), 0.0, atol=1e-7)
