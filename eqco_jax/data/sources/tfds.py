"""Any prepared TFDS builder: one of ``catalog.FACTS`` by its name, or any
other as ``tfds:NAME`` (or ``tfds:NAME/CONFIG``), read from ``data_dir``
without network access unless ``download`` is True."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import tensorflow as tf
import tensorflow_datasets as tfds

from eqco_jax.core.errors import UserError
from eqco_jax.data import catalog
from eqco_jax.data import streams
from eqco_jax.data.catalog import DatasetNotFoundError, Facts
from eqco_jax.data.sources.base import Source, Split
from eqco_jax.data.tfdata import as_written



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
  """Any prepared TFDS builder, read from ``fields.data_dir``: one of
  ``catalog.FACTS`` by its name, or any other as ``tfds:NAME`` (or
  ``tfds:NAME/CONFIG``), whose splits, classes and keys come from its
  ``DatasetInfo``.

  Each process reads its own part of a split (``tfds.split_for_jax_process``)
  in file order; training epochs go through a shuffle buffer of
  ``fields.shuffle_buffer`` (``streams.buffer_shuffled_epochs``).
  """

  @functools.cached_property
  def facts(self) -> Facts:
    """The catalog's facts; for ``tfds:NAME``, its splits (pretraining on
    'train', or the first split; testing on 'test', 'validation' or the
    pretraining split) and classes from its ``DatasetInfo``."""
    if not catalog.is_any_tfds(self.name):
      return self._facts
    info = self.builder.info
    names = list(info.splits)
    train = "train" if "train" in names else names[0]
    test = next((n for n in ("test", "validation", "val") if n in names),
                train)
    label = info.features[self._keys[1]] if self._keys[1] else None
    num_classes = int(getattr(label, "num_classes", 0) or 0)
    return dataclasses.replace(self._facts, splits=(train, train, test),
                               num_classes=num_classes)

  @functools.cached_property
  def _keys(self) -> tuple[str, str | None]:
    """The features that hold the image and the label (None: no label):
    the dataset's supervised keys, else 'image' and 'label'."""
    info = self.builder.info
    keys = info.supervised_keys
    if keys and len(keys) == 2 and all(isinstance(k, str) for k in keys):
      image, label = keys
    else:
      image, label = "image", "label"
    if image not in info.features:
      raise UserError(
          f"config.dataset={self.name!r} has no image feature {image!r} "
          f"(its features: {', '.join(info.features)}); give a TFDS image "
          "dataset.")
    return image, label if label in info.features else None

  @functools.cached_property
  def builder(self) -> Any:
    """The prepared builder, checked offline.

    Downloads and prepares only when ``fields.download`` is True. Raises
    DatasetNotFoundError (a FileNotFoundError and a UserError), saying how
    to get the data, if it is not prepared.
    """
    fields = self.fields
    try:
      builder = tfds.builder(catalog.tfds_name(self.name),
                             data_dir=fields.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise UserError(
          f"config.dataset={self.name!r}: TFDS has no dataset "
          f"{catalog.tfds_name(self.name)!r}; use a name from "
          "https://www.tensorflow.org/datasets/catalog (tfds:NAME or "
          "tfds:NAME/CONFIG).") from None
    if not _is_prepared(builder) and fields.download:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=fields.manual_dir))
    if not _is_prepared(builder):
      raise DatasetNotFoundError(self._not_prepared_message(builder))
    return builder

  def _not_prepared_message(self, builder: Any) -> str:
    return catalog.not_prepared_message(
        self.name, str(builder.data_dir), self.fields,
        data_dir_root=str(builder.data_dir_root))

  def num_examples(self, split: Split | Any) -> int:
    """Number of examples in ``split`` (TFDS slicing syntax allowed, or a
    process's part of a split)."""
    splits = self.builder.info.splits
    split = split.name if isinstance(split, Split) else split
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
        decoders=self._encoded)

    def select(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
      return {**self._image_and_label(example), "id": example["tfds_id"]}

    return ds.map(as_written(select),
                  num_parallel_calls=tf.data.AUTOTUNE)

  @property
  def _encoded(self) -> dict[str, Any]:
    """TFDS decoders that leave the image feature encoded."""
    return {self._keys[0]: tfds.decode.SkipDecoding()}

  def _image_and_label(self, example: dict[str, tf.Tensor]
                       ) -> dict[str, tf.Tensor]:
    """{'image': the image feature, 'label': int32, -1 without labels} of a
    deserialized example."""
    image_key, label_key = self._keys
    label = (tf.cast(example[label_key], tf.int32) if label_key
             else tf.constant(-1, tf.int32))
    return {"image": example[image_key], "label": label}

  def train_stream(self, split: Split, *, global_batch_size: int,
                   start_step: int, shuffle_seed: int, process_index: int,
                   process_count: int) -> tf.data.Dataset:
    """Drops a remainder of fewer than ``process_count`` examples.

    TFRecord shards (TFDS's default format) are read by
    ``streams.sharded_epochs``: each epoch a new shard order, windows of
    ``fields.shuffle_buffer`` records shuffled, a window's shards read
    interleaved and the next window read while one is consumed, a resume
    that parses less than a window it does not use. Shards this reader
    cannot open (another file format, or ``tfds.testing.mock_data``, which
    makes none) go through TFDS's own reader and a shuffle buffer instead (a
    resume reads the epoch up to its step).
    """
    part = _process_part(split.name, process_index, process_count,
                         drop_remainder=True)
    local_batch = streams.local_batch_size(global_batch_size, process_count)
    options = dict(split=split.name, local_batch=local_batch,
                   start_step=start_step, shuffle_seed=shuffle_seed,
                   process_index=process_index, process_count=process_count)
    shards = [(f.filename, f.skip, f.take)
              for f in self.builder.info.splits[part].file_instructions]
    if (self.builder.info.file_format == tfds.core.FileFormat.TFRECORD
        and shards and tf.io.gfile.exists(shards[0][0])):
      return streams.sharded_epochs(shards, self._read_shard,
                                    window=self.fields.shuffle_buffer,
                                    **options)
    return streams.buffer_shuffled_epochs(
        self.records(part), self.num_examples(part),
        shuffle_buffer=self.fields.shuffle_buffer, **options)

  def _read_shard(self, filename: tf.Tensor, skip: tf.Tensor,
                  take: tf.Tensor) -> tf.data.Dataset:
    """Records ``skip .. skip + take - 1`` of one TFRecord shard, as
    :meth:`records` gives them (the same ids)."""
    features = self.builder.info.features
    name = tf.strings.regex_replace(filename, r"^.*/", "")

    def parse(index: tf.Tensor, record: tf.Tensor) -> dict[str, tf.Tensor]:
      example = features.deserialize_example(record, decoders=self._encoded)
      return {**self._image_and_label(example),
              "id": tf.strings.join([name, tf.strings.as_string(index)],
                                    "__")}

    records = read_shard_records(filename).skip(skip).take(take)
    return tf.data.Dataset.zip(
        tf.data.Dataset.range(skip, skip + take), records).map(
            as_written(parse))

  def eval_examples(self, split: Split, *, local_batch: int,
                    process_index: int,
                    process_count: int) -> tf.data.Dataset:
    del local_batch  # Parts are contiguous runs of the split.
    return self.records(_process_part(split.name, process_index, process_count,
                                      drop_remainder=False))
