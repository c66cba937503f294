"""Sources: the embedded digits, TFDS builders, and the missing-data message."""

import time

import numpy as np
import pytest
import tensorflow as tf

from eqco_jax import datasets
from eqco_jax import input_pipeline
from eqco_jax.errors import UserError


def _config(**overrides):
  config = input_pipeline.default_config()
  config.update(overrides)
  return config


def test_digits_shapes_labels_and_class_balance():
  train_x, train_y = datasets.digits_split("train")
  test_x, test_y = datasets.digits_split("test")
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
  again_x, again_y = datasets.digits_split("test")
  np.testing.assert_array_equal(again_x, test_x)
  np.testing.assert_array_equal(again_y, test_y)


def test_digits_resized_to_the_configured_size():
  images, labels = datasets.digits_split("test", image_size=48)
  assert images.shape == (1000, 48, 48, 3) and labels.shape == (1000,)
  native, _ = datasets.digits_split("test")
  # Resizing keeps the ink where it was: mean intensity within 5%.
  assert abs(images.mean() / native.mean() - 1) < 0.05


def test_digits_info():
  info = datasets.get_info(_config())
  assert info == datasets.DatasetInfo(
      name="digits", num_train_examples=4000, num_classes=10, image_size=32,
      mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), channels=3,
      eval_crop_fraction=1.0)
  assert input_pipeline.num_eval_examples(_config(), "train") == 4000
  assert input_pipeline.num_eval_examples(_config(), "test") == 1000


def test_split_defaults_and_overrides():
  stl = _config(dataset="stl10")
  assert datasets.split_name(stl, datasets.PRETRAIN) == "unlabelled"
  assert datasets.split_name(stl, datasets.EVAL_TRAIN) == "train"
  imagenet = _config(dataset="imagenet2012", eval_test_split="train[:1000]")
  assert datasets.split_name(imagenet, datasets.EVAL_TEST) == "train[:1000]"
  assert datasets.split_name(imagenet, datasets.PRETRAIN) == "train"


def test_unknown_dataset_is_a_user_error():
  with pytest.raises(UserError, match="Unknown dataset 'mnist'.*cifar10"):
    datasets.get_info(_config(dataset="mnist"))


def test_missing_imagenet_says_where_the_tars_go(tmp_path):
  start = time.perf_counter()
  config = _config(dataset="imagenet2012", data_dir=str(tmp_path))
  with pytest.raises(datasets.DatasetNotFoundError) as error:
    datasets.get_info(config)
  assert time.perf_counter() - start < 10  # Offline: no network attempt.
  message = str(error.value)
  assert isinstance(error.value, FileNotFoundError)
  assert isinstance(error.value, UserError)
  assert "ILSVRC2012_img_train.tar" in message
  assert "ILSVRC2012_img_val.tar" in message
  assert str(tmp_path / "downloads" / "manual") in message
  assert "download=True" in message and message.count("\n") == 0
  config.manual_dir = "/my/tars"
  with pytest.raises(datasets.DatasetNotFoundError, match="into /my/tars"):
    datasets.get_info(config)


def test_missing_small_dataset_says_how_to_download(tmp_path):
  config = _config(dataset="cifar100", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError,
                     match=r"'cifar100' is not prepared .*download=True"):
    input_pipeline.pretrain_batches_numpy(config)


def test_prepared_tfds_dataset_is_read_offline(fake_tfds_dir):
  config = _config(dataset="cifar10", data_dir=fake_tfds_dir)
  info = datasets.get_info(config)
  assert (info.num_train_examples, info.num_classes, info.image_size) == (
      50, 10, 32)
  assert datasets.num_examples(config, "test") == 23
  assert datasets.num_examples(config, "train[:20%]") == 10
  examples = list(datasets.tfds_dataset(config, "test"))
  assert len(examples) == 23
  first = examples[0]
  assert first["image"].dtype == tf.string  # Still encoded (SkipDecoding).
  decoded = tf.io.decode_png(first["image"]).numpy()
  assert decoded.shape == (32, 32, 3) and decoded[0, 0, 1] == 1
  assert first["label"].dtype == tf.int32
  assert first["label"].numpy() == decoded[0, 0, 0] % 10
  with pytest.raises(UserError, match="Split 'validation' does not exist"):
    datasets.num_examples(config, "validation")
