"""eqco_jax.core.training.train_state: the EMA of the key encoder."""

import jax.numpy as jnp
import numpy as np

from eqco_jax.core.training import train_state as train_state_lib


def test_ema_arithmetic():
  target = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(10.0)}}
  online = {"a": jnp.array([3.0, 0.0]), "b": {"c": jnp.array(0.0)}}
  out = train_state_lib.ema_update(target, online, 0.75)
  np.testing.assert_allclose(out["a"], [1.5, 1.5])
  np.testing.assert_allclose(out["b"]["c"], 7.5)
  np.testing.assert_allclose(
      train_state_lib.ema_update(target, online, 0.0)["a"], online["a"])
