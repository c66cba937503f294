"""eqco_jax.core.models.batch_norm: BatchNorm over the global batch or per
group, against flax's."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqco_jax.core import models


KEY = jax.random.key(0)


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
