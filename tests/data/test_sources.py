"""eqco_jax.data.sources: the interface, the embedded digits, TFDS builders
(missing ones: test_catalog.py)."""

import inspect

import numpy as np
import pytest
import tensorflow as tf

from helpers import data_config as _config
from eqco_jax.core.errors import UserError
from eqco_jax.data import pipeline
from eqco_jax.data import catalog
from eqco_jax.data import sources


def _digits(split, **overrides):
  return sources.get_source(_config(**overrides)).arrays(split)


@pytest.mark.parametrize("name", tuple(catalog.FACTS))
def test_every_registered_source_satisfies_the_interface(name):
  """(Image folders and tfds:NAME learn their classes when they read the
  data: tests/data/test_folders.py.)"""
  source = sources.get_source(_config(dataset=name))  # Reads nothing.
  assert isinstance(source, sources.Source) and source.name == name
  facts = source.facts
  for role in sources.ROLES:
    assert isinstance(source.split(role), str) and source.split(role)
  assert facts.num_classes >= 2 and facts.image_size >= 8
  assert len(facts.mean) == len(facts.std) == 3
  assert all(0 < m < 1 for m in facts.mean) and all(0 < s < 1
                                                    for s in facts.std)
  assert 0 < facts.eval_crop_fraction <= 1
  assert not inspect.isabstract(type(source))  # Every stream implemented.


def test_unknown_dataset_is_one_sentence_naming_the_choices():
  with pytest.raises(UserError) as error:
    sources.get_source(_config(dataset="svhn"))
  message = str(error.value)
  assert message.startswith("config.dataset='svhn' is not allowed: use one "
                            "of (")
  assert "'cifar10'" in message and "'digits'" in message
  assert message.endswith("or tfds:NAME for any other TFDS dataset.")
  assert "'image_folder'" in message and ". " not in message
  assert "\n" not in message


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
    sources.get_source(_config()).num_examples("val")


def test_split_defaults_and_overrides():
  stl = sources.get_source(_config(dataset="stl10"))
  assert stl.split(sources.PRETRAIN) == "unlabelled"
  assert stl.split(sources.EVAL_TRAIN) == "train"
  imagenet = sources.get_source(
      _config(dataset="imagenet2012", eval_test_split="train[:1000]"))
  assert imagenet.split(sources.EVAL_TEST) == "train[:1000]"
  assert imagenet.split(sources.PRETRAIN) == "train"
  with pytest.raises(UserError, match="Unknown split role 'val'"):
    imagenet.split("val")


def test_prepared_tfds_dataset_is_read_offline(fake_tfds_dir):
  source = sources.get_source(_config(dataset="cifar10",
                                      data_dir=fake_tfds_dir))
  info = source.info
  assert (info.num_train_examples, info.num_classes, info.image_size) == (
      50, 10, 32)
  assert source.num_examples("test") == 23
  assert source.num_examples("train[:20%]") == 10
  examples = list(source.records("test"))
  assert len(examples) == 23
  first = examples[0]
  assert first["image"].dtype == tf.string  # Still encoded (SkipDecoding).
  decoded = tf.io.decode_png(first["image"]).numpy()
  assert decoded.shape == (32, 32, 3) and decoded[0, 0, 1] == 1
  assert first["label"].dtype == tf.int32
  assert first["label"].numpy() == decoded[0, 0, 0] % 10
  with pytest.raises(UserError, match="Split 'validation' does not exist"):
    source.num_examples("validation")
