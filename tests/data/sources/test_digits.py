"""eqco_jax.data.sources.digits: the embedded MNIST digits, their fixed
split, size and facts."""

import numpy as np
import pytest

from helpers import data_config as _config
from eqco_jax.core.errors import UserError
from eqco_jax.data import pipeline
from eqco_jax.data import sources
from eqco_jax.data.sources.base import Split


def _digits(split, **overrides):
  return sources.get_source(_config(**overrides)).arrays(split)


def test_digits_shapes_labels_and_class_balance():
  train_x, train_y = _digits("train")
  test_x, test_y = _digits("test")
  assert train_x.shape == (4000, 32, 32, 3) and train_x.dtype == np.uint8
  assert test_x.shape == (1000, 32, 32, 3) and test_y.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(train_y), [400] * 10)
  np.testing.assert_array_equal(np.bincount(test_y), [100] * 10)
  # Grey replicated to RGB; MNIST's 2-pixel frame from the 28 -> 32 padding.
  np.testing.assert_array_equal(train_x[..., 0], train_x[..., 2])
  assert train_x[:, :2].max() == 0 and train_x[:, :, -2:].max() == 0
  assert train_x.max() == 255 and 20 < train_x.mean() < 60
  # The two splits share no image, and the split is fixed.
  train_rows = {x.tobytes() for x in train_x}
  assert not any(x.tobytes() in train_rows for x in test_x)
  again_x, again_y = _digits("test")
  np.testing.assert_array_equal(again_x, test_x)
  np.testing.assert_array_equal(again_y, test_y)


def test_digits_resized_to_the_configured_size():
  images, labels = _digits("test", image_size=48)
  assert images.shape == (1000, 48, 48, 3) and labels.shape == (1000,)
  native, _ = _digits("test")
  # Resizing keeps the ink where it was: mean intensity within 5%.
  assert abs(images.mean() / native.mean() - 1) < 0.05


def test_digits_info():
  info = sources.get_source(_config()).info
  assert info == sources.DatasetInfo(
      name="digits", num_train_examples=4000, num_classes=10, image_size=32,
      mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), channels=3,
      eval_crop_fraction=1.0)
  source = sources.get_source(_config())
  assert pipeline.num_eval_examples(source, "train") == 4000
  assert pipeline.num_eval_examples(source, "test") == 1000
  with pytest.raises(UserError, match="splits 'train' and 'test', not 'val'"):
    sources.get_source(_config()).num_examples(Split("val"))
