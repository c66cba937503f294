"""eqco_jax.core.evaluate.knn: the weighted kNN monitor."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import helpers
from eqco_jax.core import sharding
from eqco_jax.core.evaluate import knn


def _knn_reference(train_x, train_y, test_x, num_classes, k, temperature):
  """Brute-force weighted kNN in numpy (float64)."""
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  similarity = unit(test_x.astype(np.float64)) @ unit(
      train_x.astype(np.float64)).T
  top = np.argsort(-similarity, axis=1)[:, :k]
  votes = np.zeros((len(test_x), num_classes))
  for i in range(len(test_x)):
    for j in top[i]:
      votes[i, train_y[j]] += np.exp(similarity[i, j] / temperature)
  return votes.argmax(axis=1)


@pytest.mark.parametrize("chunk_size", [8, 1024])
def test_knn_matches_numpy_reference(chunk_size):
  rng = np.random.default_rng(0)
  train_x = rng.normal(size=(300, 16)).astype(np.float32) * 3.0
  train_y = rng.integers(0, 7, 300).astype(np.int32)
  test_x = rng.normal(size=(37, 16)).astype(np.float32)  # 37: ragged chunks.
  for k, temperature in [(20, 0.07), (5, 0.5)]:
    got = knn.knn_predict(train_x, train_y, test_x, num_classes=7, k=k,
                          temperature=temperature, chunk_size=chunk_size)
    assert got.shape == (37,) and got.dtype == jnp.int32
    np.testing.assert_array_equal(
        got, _knn_reference(train_x, train_y, test_x, 7, k, temperature))


def test_knn_weighting_beats_majority():
  # Query [1, 0]: one class-0 neighbour at cosine 1, two class-1 at 0.9.
  angle = np.arccos(0.9)
  train_x = np.array([[1.0, 0.0], [np.cos(angle), np.sin(angle)],
                      [np.cos(angle), -np.sin(angle)]], np.float32)
  train_y = np.array([0, 1, 1], np.int32)
  test_x = np.array([[2.0, 0.0]], np.float32)  # Scale must not matter.
  predict = lambda t: int(knn.knn_predict(
      train_x, train_y, test_x, num_classes=2, k=3, temperature=t)[0])
  assert predict(0.07) == 0  # e^(1/.07) > 2 e^(.9/.07).
  assert predict(1.0) == 1  # e^1 < 2 e^.9: nearly a majority vote.
  np.testing.assert_array_equal(
      [predict(0.07), predict(1.0)],
      [_knn_reference(train_x, train_y, test_x, 2, 3, t)[0]
       for t in (0.07, 1.0)])


def test_knn_clusters_and_chance():
  rng = np.random.default_rng(1)
  x, y = helpers.clusters(rng, 1500, 32, 10, spread=0.05)
  acc = knn.knn_accuracy(x[:1000], y[:1000], x[1000:], y[1000:],
                         num_classes=10)
  assert acc > 0.99
  shuffled = rng.permutation(y)  # Labels unrelated to the features.
  acc = knn.knn_accuracy(x[:1000], shuffled[:1000], x[1000:],
                         shuffled[1000:], num_classes=10)
  assert 0.03 < acc < 0.2


# ------------------------------------------- the bank sharded over the mesh.


def _sharded_bank(x, y, mesh, batch_size, pad_features=None):
  """``x [N, C]``, ``y [N]`` as batches ``[num_batches, batch_size, ...]``
  sharded on axis 1, the last one padded (label -1, features
  ``pad_features`` or zeros)."""
  num_batches = -(-len(x) // batch_size)
  pad = num_batches * batch_size - len(x)
  fill = (np.zeros((pad, x.shape[1]), np.float32) if pad_features is None
          else pad_features[:pad])
  x = np.concatenate([x, fill]).reshape(num_batches, batch_size, -1)
  y = np.concatenate([y, np.full(pad, -1, np.int32)]).reshape(num_batches, -1)
  bank = NamedSharding(mesh, PartitionSpec(None, sharding.DATA_AXIS))
  return jax.device_put(x, bank), jax.device_put(y, bank)


def test_sharded_knn_matches_host_knn():
  mesh = sharding.make_mesh()
  assert mesh.devices.size == 8
  rng = np.random.default_rng(3)
  x, y = helpers.clusters(rng, 240, 16, 6, spread=0.6)
  train_x, train_y, test_x, test_y = x[:203], y[:203], x[203:], y[203:]
  # 203 rows: 13 batches of 16 (2 rows per device), the last 5 padding.
  bank_x, bank_y = _sharded_bank(train_x, train_y, mesh, 16)
  assert bank_x.shape == (13, 16, 16)
  for k, temperature, chunk_size in [(20, 0.07, 8), (5, 0.5, 1024),
                                     (300, 0.1, 16)]:  # 300 > 203 real rows.
    options = dict(num_classes=6, k=k, temperature=temperature,
                   chunk_size=chunk_size)
    got = knn.knn_predict_sharded(bank_x, bank_y, test_x, mesh=mesh,
                                  **options)
    assert got.shape == (37,) and got.dtype == jnp.int32
    assert got.sharding.is_fully_replicated
    np.testing.assert_array_equal(
        got, knn.knn_predict(train_x, train_y, test_x, **options))
  # Test features and labels sharded and padded too: padding never counts.
  test_bank_x, test_bank_y = _sharded_bank(test_x, test_y, mesh, 16)
  assert knn.knn_accuracy_sharded(
      bank_x, bank_y, test_bank_x, test_bank_y, mesh=mesh,
      num_classes=6) == knn.knn_accuracy(train_x, train_y, test_x, test_y,
                                         num_classes=6)


def test_sharded_knn_padding_never_votes():
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(4)
  train_x, train_y = helpers.clusters(rng, 50, 8, 5, spread=0.3)
  test_x = rng.normal(size=(14, 8)).astype(np.float32)
  # 50 rows in 4 batches of 16: 14 padding rows, each a copy of a query
  # (similarity 1, the nearest of all) with label -1.
  bank_x, bank_y = _sharded_bank(train_x, train_y, mesh, 16,
                                 pad_features=test_x)
  assert np.sum(np.asarray(bank_y) == -1) == 14
  for k in (1, 3):
    np.testing.assert_array_equal(
        knn.knn_predict_sharded(bank_x, bank_y, test_x, mesh=mesh,
                                num_classes=5, k=k),
        _knn_reference(train_x, train_y, test_x, 5, k, 0.07))


def test_sharded_knn_breaks_ties_as_host_knn():
  # 6 directions, 8 copies each with their own labels (rows spread over the
  # devices): the k nearest are ties, resolved to the lowest rows as on host.
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(5)
  train_x = np.tile(rng.normal(size=(6, 8)), (8, 1)).astype(np.float32)
  train_y = rng.integers(0, 4, 48).astype(np.int32)
  test_x = rng.normal(size=(20, 8)).astype(np.float32)
  bank_x, bank_y = _sharded_bank(train_x, train_y, mesh, 16)
  for k in (1, 3, 10):
    options = dict(num_classes=4, k=k, temperature=10.0)
    np.testing.assert_array_equal(
        knn.knn_predict_sharded(bank_x, bank_y, test_x, mesh=mesh,
                                **options),
        knn.knn_predict(train_x, train_y, test_x, **options))
