"""eqco_jax.core.training.optim: the warm-up + cosine schedule, SGD with PyTorch's
semantics, LARS for large batches."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from eqco_jax.core.training import optim


def test_lars_adapts_kernels_only():
  tx = optim.create_optimizer("lars", lambda step: 1.0, weight_decay=0.1,
                              momentum=0.0)
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
  tx = optim.create_optimizer("sgd", optax.constant_schedule(0.5),
                              weight_decay=0.1, momentum=0.9)
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
