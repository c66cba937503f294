"""What is known about each dataset without reading it, the config fields
the data layer reads (``DataFields``), and the offline check that a dataset
is there.

No TensorFlow here: ``main`` runs :func:`check_present` before the heavy
imports, so a run pointed at a missing dataset stops in about a second with
the same one-sentence message the TFDS source gives.
"""

from __future__ import annotations

import dataclasses
import glob
import os

from typing import Any

import ml_collections

from eqco_jax.core import config as config_lib
from eqco_jax.core.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_MEAN = (0.5, 0.5, 0.5)
GREY_STD = (0.5, 0.5, 0.5)

DIGITS = "digits"
IMAGE_FOLDER = "image_folder"  # config.data_dir/train/CLASS/*, see folders
TFDS_PREFIX = "tfds:"  # tfds:NAME or tfds:NAME/CONFIG: any TFDS dataset


def _default_augment() -> ml_collections.FrozenConfigDict:
  return ml_collections.FrozenConfigDict(config_lib.default_config().augment)


@dataclasses.dataclass(frozen=True)
class DataFields:
  """The config fields the data layer reads, and no other: where the data
  is, its splits and normalisation, the batches and the augmentation.
  ``DataFields.of(config)`` takes them from a config (a field it lacks, or
  sets to None, keeps the default here)."""
  dataset: str = "digits"
  data_dir: str | None = None
  manual_dir: str | None = None  # ImageNet's tars, read with download=True
  download: bool = False
  train_split: str | None = None  # None: the dataset's split of each role
  eval_train_split: str | None = None
  eval_test_split: str | None = None
  image_size: int = 32
  mean: tuple[float, ...] = ()  # (): the dataset's own
  std: tuple[float, ...] = ()
  batch_size: int = 256  # global
  eval_batch_size: int = 256
  seed: int = 0
  shuffle_buffer: int = 10_000
  augment: ml_collections.FrozenConfigDict = dataclasses.field(
      default_factory=_default_augment)

  @classmethod
  def of(cls, config: Any) -> DataFields:
    """The data fields of ``config`` (a ConfigDict; DataFields as they are)."""
    if isinstance(config, DataFields):
      return config
    values = {}
    for field in dataclasses.fields(cls):
      value = config.get(field.name)
      if value is None:
        continue
      if field.name in ("mean", "std"):
        value = tuple(map(float, value))
      elif field.name == "augment":
        value = ml_collections.FrozenConfigDict(value)
      values[field.name] = value
    return cls(**values)

  def replace(self, **changes: Any) -> DataFields:
    return dataclasses.replace(self, **changes)


class DatasetNotFoundError(UserError, FileNotFoundError):
  """The dataset is not prepared where the config points; says how to get it."""


@dataclasses.dataclass(frozen=True)
class Facts:
  """Static facts about one dataset, known without reading it.

  ``splits`` are the default splits of the roles pretrain, eval_train and
  eval_test; ``image_size`` is the native side (a typical one for datasets
  of varying size); ``manual_files`` are files a user must fetch by hand.
  ``tfds`` is False for datasets that ship inside a Python package.
  """
  splits: tuple[str, str, str]
  num_classes: int
  image_size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  eval_crop_fraction: float = 1.0
  manual_files: tuple[str, ...] = ()
  tfds: bool = True


DIGITS_NATIVE_SIZE = 32  # 28x28 MNIST padded by 2 pixels on each side.

FACTS: dict[str, Facts] = {
    DIGITS: Facts(("train", "train", "test"), 10, DIGITS_NATIVE_SIZE,
                  GREY_MEAN, GREY_STD, tfds=False),
    "imagenet2012": Facts(
        ("train", "train", "validation"), 1000, 224, IMAGENET_MEAN,
        IMAGENET_STD, 0.875,
        manual_files=("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")),
    "imagenette": Facts(
        ("train", "train", "validation"), 10, 224, IMAGENET_MEAN,
        IMAGENET_STD, 0.875),
    "cifar10": Facts(
        ("train", "train", "test"), 10, 32, (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616)),
    "cifar100": Facts(
        ("train", "train", "test"), 100, 32, (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762)),
    "stl10": Facts(
        ("unlabelled", "train", "test"), 10, 96, IMAGENET_MEAN,
        IMAGENET_STD),
}


# What is known of an image folder and of any TFDS dataset before reading
# them; their sources learn the classes (and a TFDS dataset's splits) when
# they first read it. Images of any size, so ImageNet's mean, std and centre
# crop unless the config sets them.
IMAGE_FOLDER_FACTS = Facts(("train", "train", "val"), 0, 224, IMAGENET_MEAN,
                           IMAGENET_STD, 0.875, tfds=False)
ANY_TFDS_FACTS = Facts(("train", "train", "test"), 0, 224, IMAGENET_MEAN,
                       IMAGENET_STD, 0.875)


def supported() -> tuple[str, ...]:
  """Names accepted as ``config.dataset`` (and ``tfds:NAME``)."""
  return (*FACTS, IMAGE_FOLDER)


def is_any_tfds(name: str) -> bool:
  """True for ``tfds:NAME`` (or ``tfds:NAME/CONFIG``)."""
  return name.startswith(TFDS_PREFIX) and len(name) > len(TFDS_PREFIX)


def tfds_name(name: str) -> str:
  """The TFDS builder name of dataset ``name``: ``tfds:NAME`` -> NAME."""
  return name[len(TFDS_PREFIX):] if is_any_tfds(name) else name


def facts_of(name: str) -> Facts:
  """The facts of dataset ``name``; one sentence if it is not supported."""
  if name in FACTS:
    return FACTS[name]
  if name == IMAGE_FOLDER:
    return IMAGE_FOLDER_FACTS
  if is_any_tfds(name):
    return ANY_TFDS_FACTS
  raise UserError(f"config.dataset={name!r} is not allowed: use one of "
                  f"{supported()}, or tfds:NAME for any other TFDS dataset.")


def normalisation(fields: DataFields | ml_collections.ConfigDict
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel (mean, std) on the [0, 1] scale: the fields ``mean`` and
  ``std`` where set (non-empty), else the dataset's."""
  fields = DataFields.of(fields)
  facts = facts_of(fields.dataset)
  mean = fields.mean or facts.mean
  std = fields.std or facts.std
  return tuple(map(float, mean)), tuple(map(float, std))


def default_data_dir() -> str:
  """Where TFDS looks when ``config.data_dir`` is not set."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.join(
      os.path.expanduser("~"), "tensorflow_datasets")


def not_prepared_message(name: str, where: str, fields: DataFields, *,
                         data_dir_root: str) -> str:
  """The one sentence for a dataset missing from ``where``: how to get it."""
  facts = facts_of(name)
  if facts.manual_files:
    manual_dir = fields.manual_dir or os.path.join(
        data_dir_root, "downloads", "manual")
    how = (f"put {' and '.join(facts.manual_files)} into {manual_dir} (or set "
           f"config.manual_dir to where they are) and run once with "
           f"config.download=True to prepare it")
  else:
    how = "run once with config.download=True (needs network access)"
  return (f"Dataset {name!r} is not prepared in {where}: {how}, or set "
          f"config.data_dir to a TFDS data_dir where it is prepared.")


def check_present(fields: DataFields | ml_collections.ConfigDict) -> None:
  """Raises DatasetNotFoundError, before any heavy import, when
  ``fields.dataset`` is a TFDS dataset with no prepared version in a local
  ``data_dir`` and ``download`` is off.

  Remote data dirs (``gs://...``) and anything subtler (which version, which
  splits) are left to the TFDS source, which checks again when it opens.
  """
  fields = DataFields.of(fields)
  facts = facts_of(fields.dataset)
  if fields.dataset == IMAGE_FOLDER:
    _check_image_folder(fields)
  if not facts.tfds or fields.download:
    return
  root = fields.data_dir or default_data_dir()
  if "://" in root:
    return
  dataset_dir = os.path.join(root, tfds_name(fields.dataset))
  if not glob.glob(os.path.join(glob.escape(dataset_dir), "**",
                                "dataset_info.json"), recursive=True):
    raise DatasetNotFoundError(not_prepared_message(
        fields.dataset, dataset_dir, fields, data_dir_root=root))


def image_folder_root(fields: DataFields) -> str:
  """``data_dir``, where an image folder's splits are; one sentence if it
  is not set."""
  root = fields.data_dir
  if not root:
    raise DatasetNotFoundError(
        "config.dataset='image_folder' reads the images in config.data_dir, "
        "which is not set; set it to the folder that holds train/ (and "
        "val/).")
  return root


def _check_image_folder(fields: DataFields) -> None:
  """A local image folder's pretraining split must be a folder."""
  from eqco_jax.data import folders  # (fsspec: image folders only)

  root = image_folder_root(fields)
  split = fields.train_split or IMAGE_FOLDER_FACTS.splits[0]
  folder = folders.split_folder(root, split)
  if not folders.is_url(root) and not os.path.isdir(folder):
    raise DatasetNotFoundError(
        f"config.dataset='image_folder' pretrains on the images in "
        f"{folder}, which is not a folder; set config.data_dir to the "
        f"folder that holds {split}/CLASS/*.JPEG (and val/), as "
        "torchvision's ImageFolder reads it.")
