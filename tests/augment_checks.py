"""Checks shared by the host's (data/test_augment.py) and the device's
(core/test_device_augment.py) augmentation tests."""

import numpy as np
import tensorflow as tf

from eqco_jax.core import config as config_lib
from eqco_jax.data import augment


N = 2000  # Samples per statistic; a rate's standard error is <= 0.011.


def augment_config(**overrides):
  config = config_lib.default_config().augment
  config.update(overrides)
  return config


def seed(i):
  return tf.stack([tf.constant(7, tf.int64), tf.cast(i, tf.int64)])


def over_seeds(fn, n=N):
  """fn(seed) for n seeds, batched into numpy arrays."""
  ds = tf.data.Dataset.range(n).map(lambda i: fn(seed(i)))
  return tf.nest.map_structure(lambda x: x.numpy(), next(iter(ds.batch(n))))


def colorful(n, size, seed=0):
  """uint8 [n, size, size, 3] with strongly different channels."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def is_gray(images):
  return np.all(images[..., 0] == images[..., 1], axis=(1, 2)) & np.all(
      images[..., 1] == images[..., 2], axis=(1, 2))


def check_param_statistics(params, cfg):
  assert abs(params["jitter"].mean() - cfg.color_jitter_prob) < 0.04
  assert abs(params["grayscale"].mean() - cfg.grayscale_prob) < 0.04
  assert abs(params["blur"].mean() - cfg.blur_prob) < 0.04
  for key in ("brightness", "contrast", "saturation"):
    assert 0.6 <= params[key].min() < 0.62 and 1.38 < params[key].max() <= 1.4
    assert abs(params[key].mean() - 1.0) < 0.03
  assert -0.1 <= params["hue"].min() < -0.095 and params["hue"].max() <= 0.1
  assert 0.1 <= params["sigma"].min() and params["sigma"].max() <= 2.0
  order = np.asarray(params["order"])
  np.testing.assert_array_equal(np.sort(order, 1), np.tile(np.arange(4),
                                                           (len(order), 1)))
  first_op_rate = np.bincount(order[:, 0], minlength=4) / len(order)
  np.testing.assert_allclose(first_op_rate, 0.25, atol=0.04)


def host_color(images, cfg, seed_offset=0):
  params = over_seeds(lambda s: augment.sample_color_params(
      tf.stack([s[0], s[1] + seed_offset]), cfg), n=len(images))
  return augment.color_augment_batch(tf.constant(images), params,
                                     cfg).numpy(), params

