"""Augmentation statistics on the host (tf) and on the device (jax)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from eqco_jax import config as config_lib
from eqco_jax import device_augment
from eqco_jax.data import augment
from eqco_jax.data import pipeline

N = 2000  # Samples per statistic; a rate's standard error is <= 0.011.


def _config(**overrides):
  config = config_lib.augment_config()
  config.update(overrides)
  return config


def _seed(i):
  return tf.stack([tf.constant(7, tf.int64), tf.cast(i, tf.int64)])


def _over_seeds(fn, n=N):
  """fn(seed) for n seeds, batched into numpy arrays."""
  ds = tf.data.Dataset.range(n).map(lambda i: fn(_seed(i)))
  return tf.nest.map_structure(lambda x: x.numpy(), next(iter(ds.batch(n))))


def _colourful(n, size, seed=0):
  """uint8 [n, size, size, 3] with strongly different channels."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _is_gray(images):
  return np.all(images[..., 0] == images[..., 1], axis=(1, 2)) & np.all(
      images[..., 1] == images[..., 2], axis=(1, 2))


# ---------------------------------------------------------------- crops.


def _torchvision_mean_area(height, width, scale, ratio, n=20000):
  """Mean area fraction of torchvision's RandomResizedCrop, by simulation."""
  rng = np.random.default_rng(0)
  total = 0.0
  for _ in range(n):
    for _ in range(10):
      area = height * width * rng.uniform(*scale)
      aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
      w, h = round(np.sqrt(area * aspect)), round(np.sqrt(area / aspect))
      if 0 < w <= width and 0 < h <= height:
        break
    else:
      w, h = width, height
    total += w * h / (height * width)
  return total / n


@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.08, 1.0)])
def test_crop_areas_and_ratios_inside_the_configured_range(scale):
  ratio = (3 / 4, 4 / 3)
  shape = tf.constant([375, 500, 3])
  y, x, h, w = _over_seeds(
      lambda s: augment.sample_crop_window(shape, s, scale, ratio))
  area = h * w / (375 * 500)
  # Rounding the window to pixels moves area and ratio by < 1%.
  assert area.min() >= scale[0] * 0.99 and area.max() <= 1.0
  assert (w / h).min() >= ratio[0] * 0.99 and (w / h).max() <= ratio[1] * 1.01
  assert np.all((y >= 0) & (x >= 0) & (y + h <= 375) & (x + w <= 500))
  # torchvision's distribution: area uniform (then rejection), log-uniform
  # ratio, uniform offsets.
  assert area.min() < scale[0] + 0.02 and area.max() > 0.95
  expected = _torchvision_mean_area(375, 500, scale, ratio, n=5000)
  assert abs(area.mean() - expected) < 0.02
  assert abs(np.median(np.log(w / h)) - 0.05) < 0.05
  assert len(np.unique(x)) > 100 and len(np.unique(y)) > 100


def test_crop_falls_back_to_the_largest_allowed_centre_crop():
  # A 10 x 100 strip: no 3/4..4/3 window of >= 20% of its area fits.
  y, x, h, w = [int(v) for v in augment.sample_crop_window(
      tf.constant([10, 100, 3]), _seed(0), (0.2, 1.0), (3 / 4, 4 / 3))]
  assert (y, h, w) == (0, 10, 13) and x == (100 - 13) // 2


def test_center_crop_is_resize_256_crop_224():
  y, x, h, w = [int(v) for v in augment.center_crop_window(
      tf.constant([300, 400, 3]), 0.875)]
  assert (h, w) == (262, 262) and (y, x) == (19, 69)
  image = tf.constant(_colourful(1, 32)[0])
  same = augment.center_crop_resize(image, size=32, crop_fraction=1.0)
  np.testing.assert_array_equal(same.numpy(), image.numpy())
  jpeg = tf.io.encode_jpeg(tf.constant(_colourful(1, 300)[0][:, :200]))
  out = augment.center_crop_resize(jpeg, size=64, crop_fraction=0.875)
  assert out.shape == (64, 64, 3) and out.dtype == tf.uint8


@pytest.mark.parametrize("flip_prob", [0.0, 0.5, 1.0])
def test_flip_rate(flip_prob):
  image = tf.constant(_colourful(1, 16)[0])  # No symmetric rows.
  views = _over_seeds(lambda s: augment.random_resized_crop_flip(
      image, s, size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0),
      flip_prob=flip_prob), n=1000)
  flipped = np.all(views == image.numpy()[:, ::-1], axis=(1, 2, 3))
  kept = np.all(views == image.numpy(), axis=(1, 2, 3))
  assert np.all(flipped ^ kept)  # Whole-image crops: either one or the other.
  assert abs(flipped.mean() - flip_prob) < 0.05


def test_crop_from_jpeg_bytes_matches_crop_from_pixels():
  # Without chroma subsampling, decoding a window is exact.
  encoded = tf.io.encode_jpeg(_colourful(1, 96)[0], quality=100,
                              chroma_downsampling=False)
  decoded = tf.io.decode_jpeg(encoded)
  kwargs = dict(size=32, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                flip_prob=0.5)
  fused = augment.random_resized_crop_flip(encoded, _seed(3), **kwargs)
  plain = augment.random_resized_crop_flip(decoded, _seed(3), **kwargs)
  np.testing.assert_array_equal(fused.numpy(), plain.numpy())


# ---------------------------------------------------- colour parameters.


def _check_param_statistics(params, cfg):
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


def test_host_colour_parameter_distributions():
  cfg = _config()
  _check_param_statistics(
      _over_seeds(lambda s: augment.sample_color_params(s, cfg)), cfg)


def test_device_colour_parameter_distributions():
  cfg = _config()
  keys = jax.random.split(jax.random.key(0), N)
  params = jax.vmap(lambda k: device_augment.sample_color_params(k, cfg))(keys)
  _check_param_statistics(jax.tree.map(np.asarray, params), cfg)


# ----------------------------------------------------- host colour stage.


def _host_colour(images, cfg, seed_offset=0):
  params = _over_seeds(lambda s: augment.sample_color_params(
      tf.stack([s[0], s[1] + seed_offset]), cfg), n=len(images))
  return augment.color_augment_batch(tf.constant(images), params,
                                     cfg).numpy(), params


def test_host_grayscale_rate_and_jitter_off_at_p0():
  cfg = _config(color_jitter_prob=0.0, blur_prob=0.0, grayscale_prob=0.2)
  images = _colourful(1000, 8)
  out, params = _host_colour(images, cfg)
  gray = _is_gray(out)
  assert abs(gray.mean() - 0.2) < 0.04
  np.testing.assert_array_equal(gray, params["grayscale"])
  # Everything else went through untouched: jitter is off at p = 0.
  np.testing.assert_array_equal(out[~gray], images[~gray])
  luma = np.round(images[gray].astype(np.float32) @ np.array(augment.LUMA))
  np.testing.assert_allclose(out[gray][..., 0], luma, atol=1)


def test_host_jitter_changes_every_image_at_p1():
  cfg = _config(color_jitter_prob=1.0, grayscale_prob=0.0, blur_prob=0.0)
  images = _colourful(200, 8)
  out, _ = _host_colour(images, cfg)
  change = np.abs(out.astype(int) - images).mean(axis=(1, 2, 3))
  assert np.all(change > 1) and 5 < change.mean() < 60


def test_host_hue_matches_tf_adjust_hue():
  cfg = _config()
  images = _colourful(8, 16)
  params = {
      "jitter": np.ones(8, bool), "grayscale": np.zeros(8, bool),
      "blur": np.zeros(8, bool), "sigma": np.ones(8, np.float32),
      "brightness": np.ones(8, np.float32),
      "contrast": np.ones(8, np.float32),
      "saturation": np.ones(8, np.float32),
      "hue": np.linspace(-0.5, 0.45, 8).astype(np.float32),
      "order": np.tile(np.arange(4, dtype=np.int32), (8, 1))}
  out = augment.color_augment_batch(tf.constant(images), params, cfg)
  expected = [tf.image.adjust_hue(tf.constant(im, tf.float32) / 255, d)
              for im, d in zip(images, params["hue"])]
  np.testing.assert_allclose(out.numpy() / 255, np.stack(expected), atol=2e-3)


def test_blur_smooths_with_a_kernel_about_a_tenth_of_the_side():
  assert augment.blur_kernel_size(224, 0.1) == 23
  assert augment.blur_kernel_size(32, 0.1) == 3
  cfg = _config(color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=1.0,
                blur_sigma=(2.0, 2.0))
  images = _colourful(4, 64)
  out, _ = _host_colour(images, cfg)
  # Independent pixels blurred by a 2-D Gaussian of sigma 2: the standard
  # deviation falls by 1 / (sqrt(4 pi) sigma) ~ 0.14.
  ratio = out.astype(float).std() / images.astype(float).std()
  assert 0.11 < ratio < 0.18
  assert abs(out.astype(float).mean() - images.mean()) < 1.0


def test_simo_order_differs_from_mocov2_order_only_by_rounding():
  images = _colourful(100, 16)
  outs = [_host_colour(images, _config(blur_before_grayscale=simo))[0]
          for simo in (False, True)]
  # Grayscale and blur are commuting linear maps: same distribution.
  assert np.abs(outs[0].astype(int) - outs[1]).max() <= 1
  assert (outs[0] != images).mean() > 0.5


def test_two_views_of_an_image_differ():
  cfg = config_lib.data_config()
  cfg.batch_size = 32
  batch = next(pipeline.pretrain_batches_numpy(cfg))
  assert batch["view1"].shape == (32, 32, 32, 3)
  differ = np.any(batch["view1"] != batch["view2"], axis=(1, 2, 3))
  assert differ.all()


# -------------------------------------------------- device colour stage.


@functools.partial(jax.jit, static_argnums=2)
def _device_colour(key, images, cfg_items):
  cfg = config_lib.augment_config()
  cfg.update(dict(cfg_items))
  return device_augment.color_augment(key, images, cfg)


def _device(images, **overrides):
  out = _device_colour(jax.random.key(1), jnp.asarray(images),
                       tuple(sorted(overrides.items())))
  return np.asarray(out)


def test_device_grayscale_rate_and_jitter_off_at_p0():
  images = _colourful(1000, 8)
  out = _device(images, color_jitter_prob=0.0, blur_prob=0.0,
                grayscale_prob=0.2)
  gray = _is_gray(out)
  assert abs(gray.mean() - 0.2) < 0.04
  np.testing.assert_allclose(out[~gray], images[~gray] / 255, atol=1e-6)


def test_device_jitter_changes_every_image_at_p1():
  images = _colourful(200, 8)
  out = _device(images, color_jitter_prob=1.0, grayscale_prob=0.0,
                blur_prob=0.0)
  change = np.abs(out * 255 - images).mean(axis=(1, 2, 3))
  assert np.all(change > 1) and 5 < change.mean() < 60


@pytest.mark.parametrize("simo", [False, True])
def test_device_matches_host_for_the_same_parameters(simo):
  cfg = _config(blur_prob=0.5, blur_before_grayscale=simo)
  images = _colourful(64, 32)
  host, params = _host_colour(images, cfg)
  device = jax.vmap(lambda im, p: device_augment.color_augment_image(
      im, p, cfg))(jnp.asarray(images, jnp.float32) / 255,
                   jax.tree.map(jnp.asarray, params))
  # The host rounds to uint8 at the end; otherwise the same maths.
  diff = np.abs(np.asarray(device) * 255 - host)
  assert diff.max() <= 1.0 and diff.mean() < 0.3
  assert params["blur"].any() and params["grayscale"].any()


def test_normalize_and_prepare_views():
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
  images = _colourful(4, 8)
  expected = (images / 255.0 - mean) / std
  np.testing.assert_allclose(device_augment.normalize(images, mean, std),
                             expected, rtol=1e-5, atol=1e-5)
  batch = {"view1": jnp.asarray(images), "view2": jnp.asarray(images[::-1])}
  host_cfg = _config(on_device=False)
  v1, v2 = device_augment.prepare_views(jax.random.key(0), batch, host_cfg,
                                        mean, std)
  assert v1.dtype == jnp.float32
  np.testing.assert_allclose(v1, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(v2, expected[::-1], rtol=1e-5, atol=1e-5)

  device_cfg = _config(on_device=True, color_jitter_prob=1.0)
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
