"""eqco_jax.core.methods.simo: the loss is the public in-batch EqCo."""

import jax
import numpy as np
import pytest

from eqco_jax.core import losses
from eqco_jax.core.methods import SiMo


def _unit(key, shape):
  return losses.l2_normalize(jax.random.normal(key, shape))


@pytest.mark.parametrize("num_negatives", [None, 5])
def test_simo_loss_is_in_batch_eqco(num_negatives):
  q, k = _unit(jax.random.key(0), (16, 8)), _unit(jax.random.key(1), (16, 8))
  rng = jax.random.key(2)
  method = SiMo(temperature=0.2, alpha=4096.0, num_negatives=num_negatives)
  loss, metrics = method.loss(q, k, None, rng)
  np.testing.assert_allclose(loss, losses.in_batch_eqco(
      q, k, temperature=0.2, alpha=4096.0, num_negatives=num_negatives,
      rng=rng), rtol=1e-6)
  assert 0.0 <= float(metrics["top1"]) <= float(metrics["top5"]) <= 1.0
  assert method.init_queue(rng, 8) == (None, None)
  assert method.update_queue(None, None, k) == (None, None)
