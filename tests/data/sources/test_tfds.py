"""eqco_jax.data.sources.tfds: a prepared TFDS dataset read offline, its
records still encoded (missing datasets: tests/data/test_catalog.py)."""

import pytest
import tensorflow as tf

import helpers
from helpers import data_config as _config
from eqco_jax.core.errors import UserError
from eqco_jax.data import catalog
from eqco_jax.data import pipeline
from eqco_jax.data import sources
from eqco_jax.data.sources.base import Split


def test_prepared_tfds_dataset_is_read_offline(fake_tfds_dir):
  source = sources.get_source(_config(dataset="cifar10",
                                      data_dir=fake_tfds_dir))
  info = source.info
  assert (info.num_train_examples, info.num_classes, info.image_size) == (
      50, 10, 32)
  assert source.num_examples(Split("test")) == 23
  assert source.num_examples(Split("train[:20%]")) == 10
  examples = list(source.records("test"))
  assert len(examples) == 23
  first = examples[0]
  assert first["image"].dtype == tf.string  # Still encoded (SkipDecoding).
  decoded = tf.io.decode_png(first["image"]).numpy()
  assert decoded.shape == (32, 32, 3) and decoded[0, 0, 1] == 1
  assert first["label"].dtype == tf.int32
  assert first["label"].numpy() == decoded[0, 0, 0] % 10
  with pytest.raises(UserError, match="Split 'validation' does not exist"):
    source.num_examples(Split("validation"))


@pytest.fixture
def mock_flowers(tmp_path):
  """tfds.testing.mock_data for oxford_flowers102 (train, validation, test,
  102 classes), 12 examples per split."""
  with helpers.mocked_tfds("oxford_flowers102", tmp_path,
                           ("train", "validation", "test"), 12) as data_dir:
    yield data_dir


def test_any_tfds_dataset_by_name(mock_flowers):
  config = _config(dataset="tfds:oxford_flowers102", data_dir=mock_flowers,
                   image_size=16, batch_size=4, eval_batch_size=6)
  source = sources.get_source(config)
  assert source.split(sources.PRETRAIN).name == "train"
  assert source.split(sources.EVAL_TEST).name == "test"
  info = source.info
  assert (info.num_classes, info.mean) == (102, catalog.IMAGENET_MEAN)
  batch = next(pipeline.pretrain_dataset(source).as_numpy_iterator())
  assert batch["view1"].shape == (4, 16, 16, 3)
  with pytest.raises(UserError, match="TFDS has no dataset 'no_such_set'"):
    _ = sources.get_source(_config(dataset="tfds:no_such_set",
                                   data_dir=mock_flowers)).builder
  with pytest.raises(UserError, match="or tfds:NAME for any other"):
    catalog.facts_of("flowers")
