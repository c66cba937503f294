"""eqco_jax.core.device_augment: the colour stage on the accelerator has the
host's distributions and, for the same parameters, its results."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import augment_checks
from eqco_jax.core import config as config_lib
from eqco_jax.core import device_augment


def test_device_color_parameter_distributions():
  cfg = augment_checks.augment_config()
  keys = jax.random.split(jax.random.key(0), augment_checks.N)
  params = jax.vmap(lambda k: device_augment.sample_color_params(k, cfg))(keys)
  augment_checks.check_param_statistics(jax.tree.map(np.asarray, params), cfg)


@functools.partial(jax.jit, static_argnums=2)
def _device_color(key, images, cfg_items):
  cfg = config_lib.default_config().augment
  cfg.update(dict(cfg_items))
  return device_augment.color_augment(key, images, cfg)


def _device(images, **overrides):
  out = _device_color(jax.random.key(1), jnp.asarray(images),
                       tuple(sorted(overrides.items())))
  return np.asarray(out)


def test_device_grayscale_rate_and_jitter_off_at_p0():
  images = augment_checks.colorful(1000, 8)
  out = _device(images, color_jitter_prob=0.0, blur_prob=0.0,
                grayscale_prob=0.2)
  gray = augment_checks.is_gray(out)
  assert abs(gray.mean() - 0.2) < 0.04
  np.testing.assert_allclose(out[~gray], images[~gray] / 255, atol=1e-6)


def test_device_jitter_changes_every_image_at_p1():
  images = augment_checks.colorful(200, 8)
  out = _device(images, color_jitter_prob=1.0, grayscale_prob=0.0,
                blur_prob=0.0)
  change = np.abs(out * 255 - images).mean(axis=(1, 2, 3))
  assert np.all(change > 1) and 5 < change.mean() < 60


@pytest.mark.parametrize("simo", [False, True])
def test_device_matches_host_for_the_same_parameters(simo):
  cfg = augment_checks.augment_config(blur_prob=0.5, blur_before_grayscale=simo)
  images = augment_checks.colorful(64, 32)
  host, params = augment_checks.host_color(images, cfg)
  device = jax.vmap(lambda im, p: device_augment.color_augment_image(
      im, p, cfg))(jnp.asarray(images, jnp.float32) / 255,
                   jax.tree.map(jnp.asarray, params))
  # The host rounds to uint8 at the end; otherwise the same maths.
  diff = np.abs(np.asarray(device) * 255 - host)
  assert diff.max() <= 1.0 and diff.mean() < 0.3
  assert params["blur"].any() and params["grayscale"].any()


def test_normalize_and_prepare_views():
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
  images = augment_checks.colorful(4, 8)
  expected = (images / 255.0 - mean) / std
  np.testing.assert_allclose(device_augment.normalize(images, mean, std),
                             expected, rtol=1e-5, atol=1e-5)
  batch = {"view1": jnp.asarray(images), "view2": jnp.asarray(images[::-1])}
  host_cfg = augment_checks.augment_config(on_device=False)
  v1, v2 = device_augment.prepare_views(jax.random.key(0), batch, host_cfg,
                                        mean, std)
  assert v1.dtype == jnp.float32
  np.testing.assert_allclose(v1, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(v2, expected[::-1], rtol=1e-5, atol=1e-5)

  device_cfg = augment_checks.augment_config(on_device=True,
                                             color_jitter_prob=1.0)
  prepare = jax.jit(functools.partial(device_augment.prepare_views,
                                      augment_config=device_cfg, mean=mean,
                                      std=std))
  d1, d2 = prepare(jax.random.key(0), batch)
  again, _ = prepare(jax.random.key(0), batch)
  other, _ = prepare(jax.random.key(1), batch)
  np.testing.assert_array_equal(d1, again)
  assert np.abs(np.asarray(d1) - np.asarray(other)).mean() > 0.05
  assert np.abs(np.asarray(d1) - expected).mean() > 0.05
  assert d1.shape == d2.shape == (4, 8, 8, 3) and np.isfinite(d1).all()
