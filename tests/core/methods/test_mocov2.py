"""eqco_jax.core.methods.mocov2: the queue, Shuffle BN, and the loss against
K queue entries."""

import jax
import jax.numpy as jnp
import numpy as np

from eqco_jax.core import losses
from eqco_jax.core import models
from eqco_jax.core.methods import MoCoV2
from eqco_jax.core.methods import mocov2


def test_queue_is_fifo_and_wraps_around():
  dim, batch, size = 3, 2, 6
  queue = jnp.zeros((size, dim))
  ptr = jnp.zeros((), jnp.int32)
  written = []
  for i in range(5):  # 10 keys into 6 slots: wraps once.
    keys = jnp.full((batch, dim), i, jnp.float32) + jnp.arange(batch)[:, None] / 10
    written.append(keys)
    queue, ptr = jax.jit(mocov2.enqueue)(queue, ptr, keys)
  assert int(ptr) == (5 * batch) % size
  # Newest 6 keys: batches 2, 3, 4; batch 3 at rows 0-1, batch 4 at rows 2-3,
  # batch 2 (oldest still held) at rows 4-5.
  np.testing.assert_allclose(queue[0:2], written[3])
  np.testing.assert_allclose(queue[2:4], written[4])
  np.testing.assert_allclose(queue[4:6], written[2])


def test_shuffle_bn_groups_like_moco_without_moving_images():
  bn = models.BatchNorm(group_size=4)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 3)) *
                  np.arange(1, 17)[:, None], jnp.float32)
  variables = bn.init(jax.random.key(0), x, use_running_average=True)

  def forward(images, bn_order=None):
    out, new = bn.apply(variables, images, use_running_average=False,
                        order=bn_order, mutable=["batch_stats"])
    return out, new["batch_stats"]

  rng = jax.random.key(5)
  order = mocov2.shuffle_order(rng, 16)
  keys, stats = forward(x, order)
  perm = np.asarray(jax.random.permutation(rng, 16))
  # MoCo's implementation, the reference: shuffle the images, BN per
  # consecutive group, un-shuffle the outputs.
  shuffled, moco_stats = forward(x[perm])
  np.testing.assert_allclose(keys, np.asarray(shuffled)[np.argsort(perm)],
                             rtol=1e-5, atol=1e-5)
  for k in ("mean", "var"):
    np.testing.assert_allclose(stats[k], moco_stats[k], rtol=1e-5)
  # By hand: row perm[j] of x sits in group j // 4 of the shuffled batch and is
  # normalised by that group's own mean and variance.
  want = np.zeros((16, 3), np.float32)
  for g in range(4):
    rows = perm[4 * g: 4 * g + 4]
    group = np.asarray(x)[rows]
    want[rows] = (group - group.mean(0)) / np.sqrt(group.var(0) + 1e-5)
  np.testing.assert_allclose(keys, want, rtol=1e-4, atol=1e-5)
  unshuffled, _ = forward(x)
  assert not np.allclose(keys, unshuffled, atol=1e-3)  # the groups changed
  # Running statistics: the mean over groups of each group's statistics.
  group_means = np.stack(
      [np.asarray(x)[perm[4 * g: 4 * g + 4]].mean(0) for g in range(4)])
  np.testing.assert_allclose(stats["mean"], 0.1 * group_means.mean(0),
                             rtol=1e-5)


def _unit(key, shape):
  return losses.l2_normalize(jax.random.normal(key, shape))


def test_moco_loss_is_eqco_infonce_against_k_queue_entries():
  q, k = _unit(jax.random.key(0), (16, 8)), _unit(jax.random.key(1), (16, 8))
  queue = _unit(jax.random.key(3), (64, 8))
  rng = jax.random.key(4)
  method = MoCoV2(temperature=0.2, alpha=None, queue_size=64,
                  num_negatives=16)
  negatives = method.negatives(queue, rng)
  assert negatives.shape == (16, 8)
  # The K rows are queue rows, each used once.
  rows = {tuple(np.round(np.asarray(r), 6)) for r in queue}
  assert all(tuple(np.round(np.asarray(r), 6)) in rows for r in negatives)
  assert len({tuple(np.asarray(r)) for r in negatives}) == 16
  loss, _ = method.loss(q, k, queue, rng)
  np.testing.assert_allclose(loss, losses.eqco_infonce(
      q, k, negatives, temperature=0.2, alpha=None), rtol=1e-6)
  whole = MoCoV2(temperature=0.2, alpha=None, queue_size=64)
  np.testing.assert_array_equal(whole.negatives(queue, rng), queue)
