"""eqco_jax.data.augment: crops, flips and the colour stage on the host,
against torchvision's and TensorFlow's definitions."""


import numpy as np
import pytest
import tensorflow as tf

import helpers
import augment_checks
from eqco_jax.data import augment


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
  y, x, h, w = augment_checks.over_seeds(
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
      tf.constant([10, 100, 3]), augment_checks.seed(0), (0.2, 1.0), (3 / 4, 4 / 3))]
  assert (y, h, w) == (0, 10, 13) and x == (100 - 13) // 2


def test_center_crop_is_resize_256_crop_224():
  y, x, h, w = [int(v) for v in augment.center_crop_window(
      tf.constant([300, 400, 3]), 0.875)]
  assert (h, w) == (262, 262) and (y, x) == (19, 69)
  image = tf.constant(augment_checks.colorful(1, 32)[0])
  same = augment.center_crop_resize(image, size=32, crop_fraction=1.0)
  np.testing.assert_array_equal(same.numpy(), image.numpy())
  jpeg = tf.io.encode_jpeg(tf.constant(augment_checks.colorful(1, 300)[0][:, :200]))
  out = augment.center_crop_resize(jpeg, size=64, crop_fraction=0.875)
  assert out.shape == (64, 64, 3) and out.dtype == tf.uint8


@pytest.mark.parametrize("flip_prob", [0.0, 0.5, 1.0])
def test_flip_rate(flip_prob):
  image = tf.constant(augment_checks.colorful(1, 16)[0])  # No symmetric rows.
  views = augment_checks.over_seeds(lambda s: augment.random_resized_crop_flip(
      image, s, size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0),
      flip_prob=flip_prob), n=1000)
  flipped = np.all(views == image.numpy()[:, ::-1], axis=(1, 2, 3))
  kept = np.all(views == image.numpy(), axis=(1, 2, 3))
  assert np.all(flipped ^ kept)  # Whole-image crops: either one or the other.
  assert abs(flipped.mean() - flip_prob) < 0.05


def test_crop_from_jpeg_bytes_matches_crop_from_pixels():
  # Without chroma subsampling, decoding a window is exact.
  encoded = tf.io.encode_jpeg(augment_checks.colorful(1, 96)[0], quality=100,
                              chroma_downsampling=False)
  decoded = tf.io.decode_jpeg(encoded)
  kwargs = dict(size=32, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                flip_prob=0.5)
  fused = augment.random_resized_crop_flip(encoded, augment_checks.seed(3), **kwargs)
  plain = augment.random_resized_crop_flip(decoded, augment_checks.seed(3), **kwargs)
  np.testing.assert_array_equal(fused.numpy(), plain.numpy())


def test_host_color_parameter_distributions():
  cfg = augment_checks.augment_config()
  augment_checks.check_param_statistics(
      augment_checks.over_seeds(lambda s: augment.sample_color_params(s, cfg)), cfg)


def test_host_grayscale_rate_and_jitter_off_at_p0():
  cfg = augment_checks.augment_config(color_jitter_prob=0.0, blur_prob=0.0, grayscale_prob=0.2)
  images = augment_checks.colorful(1000, 8)
  out, params = augment_checks.host_color(images, cfg)
  gray = augment_checks.is_gray(out)
  assert abs(gray.mean() - 0.2) < 0.04
  np.testing.assert_array_equal(gray, params["grayscale"])
  # Everything else went through untouched: jitter is off at p = 0.
  np.testing.assert_array_equal(out[~gray], images[~gray])
  luma = np.round(images[gray].astype(np.float32) @ np.array(augment.LUMA))
  np.testing.assert_allclose(out[gray][..., 0], luma, atol=1)


def test_host_jitter_changes_every_image_at_p1():
  cfg = augment_checks.augment_config(color_jitter_prob=1.0, grayscale_prob=0.0, blur_prob=0.0)
  images = augment_checks.colorful(200, 8)
  out, _ = augment_checks.host_color(images, cfg)
  change = np.abs(out.astype(int) - images).mean(axis=(1, 2, 3))
  assert np.all(change > 1) and 5 < change.mean() < 60


def test_host_hue_matches_tf_adjust_hue():
  cfg = augment_checks.augment_config()
  images = augment_checks.colorful(8, 16)
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
  cfg = augment_checks.augment_config(color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=1.0,
                blur_sigma=(2.0, 2.0))
  images = augment_checks.colorful(4, 64)
  out, _ = augment_checks.host_color(images, cfg)
  # Independent pixels blurred by a 2-D Gaussian of sigma 2: the standard
  # deviation falls by 1 / (sqrt(4 pi) sigma) ~ 0.14.
  ratio = out.astype(float).std() / images.astype(float).std()
  assert 0.11 < ratio < 0.18
  assert abs(out.astype(float).mean() - images.mean()) < 1.0


def test_simo_order_differs_from_mocov2_order_only_by_rounding():
  images = augment_checks.colorful(100, 16)
  outs = [augment_checks.host_color(images, augment_checks.augment_config(blur_before_grayscale=simo))[0]
          for simo in (False, True)]
  # Grayscale and blur are commuting linear maps: same distribution.
  assert np.abs(outs[0].astype(int) - outs[1]).max() <= 1
  assert (outs[0] != images).mean() > 0.5


def test_two_views_of_an_image_differ():
  cfg = helpers.data_config()
  cfg.batch_size = 32
  batch = next(helpers.pretrain_numpy(cfg))
  assert batch["view1"].shape == (32, 32, 32, 3)
  differ = np.any(batch["view1"] != batch["view2"], axis=(1, 2, 3))
  assert differ.all()
