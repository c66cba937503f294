"""eqco_jax.core.evaluate.features: feature extraction."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from eqco_jax.core import sharding
from eqco_jax.core.evaluate import features as features_lib


def _padded_batches(mesh, images, labels, batch_size=8):
  """Sharded eval batches of ``images``, the last one padded (image 255,
  label 7, mask False)."""
  put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
  batches = []
  for start in range(0, len(images), batch_size):
    rows = np.arange(start, min(start + batch_size, len(images)))
    pad = batch_size - len(rows)
    batch_images = np.concatenate(
        [images[rows], np.full((pad, *images.shape[1:]), 255, np.uint8)])
    batch_labels = np.concatenate([labels[rows], np.full(pad, 7, np.int32)])
    batches.append({"image": put(batch_images), "label": put(batch_labels),
                    "mask": put(np.arange(batch_size) < len(rows))})
  return batches


def _apply_backbone(variables, x):
  return x.reshape(x.shape[0], -1)[:, :5] * variables["scale"]


def _normalize(x):
  return x.astype(jnp.float32) / 255.0


def test_extract_features_drops_padding_keeps_order():
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (21, 2, 2, 3), dtype=np.uint8)
  labels = np.arange(21, dtype=np.int32)
  # 8 + 8 + (5 real + 3 padding).
  batches = _padded_batches(mesh, images, labels)
  variables = {"scale": jnp.float32(2.0)}
  features, got_labels = features_lib.extract_features(
      _apply_backbone, variables, batches, _normalize)
  assert features.shape == (21, 5) and features.dtype == np.float32
  assert got_labels.dtype == np.int32
  np.testing.assert_array_equal(got_labels, labels)
  np.testing.assert_allclose(
      features, images.reshape(21, -1)[:, :5] / 255.0 * 2.0, rtol=1e-6)


@pytest.mark.parametrize("stack_group", [2, 64])  # 2: groups then joined.
def test_extract_sharded_features_stays_sharded(monkeypatch, stack_group):
  monkeypatch.setattr(features_lib, "STACK_GROUP", stack_group)
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (37, 2, 2, 3), dtype=np.uint8)
  labels = rng.integers(0, 5, 37).astype(np.int32)
  # 3 batches of 16 (2 rows per device), the last 11 rows padding.
  batches = _padded_batches(mesh, images, labels, batch_size=16)
  variables = {"scale": jnp.float32(2.0)}
  features, got_labels = features_lib.extract_sharded_features(
      _apply_backbone, variables, iter(batches), _normalize)
  assert features.shape == (3, 16, 5) and features.dtype == jnp.float32
  assert got_labels.shape == (3, 16) and got_labels.dtype == jnp.int32
  for x in (features, got_labels):
    assert isinstance(x.sharding, NamedSharding)
    assert tuple(x.sharding.spec)[:2] == (None, sharding.DATA_AXIS)
    shards = x.addressable_shards
    assert len({shard.device for shard in shards}) == 8
    assert all(shard.data.shape[:2] == (3, 2) for shard in shards)
  # Each device holds the rows it computed: batch rows 2d, 2d + 1.
  padded = np.concatenate([images, np.full((11, 2, 2, 3), 255, np.uint8)])
  for shard in features.addressable_shards:
    d = list(mesh.devices).index(shard.device)
    rows = np.arange(3)[:, None] * 16 + 2 * d + np.arange(2)
    np.testing.assert_allclose(
        shard.data, padded[rows].reshape(3, 2, -1)[..., :5] / 255.0 * 2.0,
        rtol=1e-6)
  # Padding rows have label -1; the real rows match extract_features.
  expected_labels = np.concatenate([labels, np.full(11, -1, np.int32)])
  np.testing.assert_array_equal(np.asarray(got_labels).reshape(-1),
                                expected_labels)
  host_features, _ = features_lib.extract_features(
      _apply_backbone, variables, batches, _normalize)
  np.testing.assert_array_equal(
      np.asarray(features).reshape(-1, 5)[:37], host_features)
