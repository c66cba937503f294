"""What every dataset's ``Source`` is: its facts, its splits by role, and the
two streams the pipelines read (``streams``).

Images leave a source as uint8: encoded bytes (TFDS records, image files;
decoded later, fused with the crop) or decoded [S, S, 3] arrays (the
embedded digits). Constructing a source reads nothing; the first count or
stream does. A source is given the data fields of the config
(``catalog.DataFields``), never the whole config.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Callable

import tensorflow as tf

from eqco_jax.core.errors import UserError
from eqco_jax.data import catalog
from eqco_jax.data import streams
from eqco_jax.data.catalog import DataFields, Facts

PRETRAIN, EVAL_TRAIN, EVAL_TEST = "pretrain", "eval_train", "eval_test"
ROLES = (PRETRAIN, EVAL_TRAIN, EVAL_TEST)
_SPLIT_FIELDS = {PRETRAIN: "train_split", EVAL_TRAIN: "eval_train_split",
                 EVAL_TEST: "eval_test_split"}

Preprocess = Callable[[tf.Tensor], tf.Tensor]
# keep_list(split folder, make) -> the list of files kept for that folder,
# made by make() the first time (the program keeps it in the workdir, so
# that a run and its resumes read one list).
KeepList = Callable[[str, Callable[[], list[str]]], list[str]]


@dataclasses.dataclass(frozen=True)
class Split:
  """A split as a role reads it: its name (TFDS slicing syntax allowed) and
  whether only its labelled examples count (the evaluation roles')."""
  name: str
  labelled_only: bool = False

  def __str__(self) -> str:
    return self.name


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the evaluators need to know about a dataset.

  ``mean`` and ``std`` are per RGB channel on the [0, 1] scale.
  ``num_train_examples`` counts the pretraining split.
  ``eval_crop_fraction`` is the centre crop used for test images (224/256 for
  large natural images, 1.0 for small images used at native size).
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
  """One dataset as the pipelines see it.

  Args:
    name: ``fields.dataset``.
    facts: what the catalog knows of it.
    fields: the config's data fields.
    keep_list: where lists of files are kept (sources that list files).
  """

  def __init__(self, name: str, facts: Facts, fields: DataFields, *,
               keep_list: KeepList | None = None):
    self.name = name
    self._facts = facts
    self.fields = fields
    self._keep_list = keep_list

  @property
  def facts(self) -> Facts:
    """The dataset's facts (sources that learn some by reading the dataset,
    such as its classes, override this)."""
    return self._facts

  def split(self, role: str) -> Split:
    """The split of ``role`` (pretrain | eval_train | eval_test): the
    config's ``train_split``, ``eval_train_split`` or ``eval_test_split``
    where set, else the dataset's; evaluation roles read labelled examples
    only."""
    if role not in ROLES:
      raise UserError(f"Unknown split role {role!r}; choose one of {ROLES}.")
    chosen = getattr(self.fields, _SPLIT_FIELDS[role])
    name = chosen or self._default_splits()[ROLES.index(role)]
    return Split(name, labelled_only=role != PRETRAIN)

  def _default_splits(self) -> tuple[str, str, str]:
    """The dataset's splits of the roles (pretrain, eval_train, eval_test)."""
    return self.facts.splits

  def require(self, *roles: str) -> None:
    """Opens the splits of ``roles``: a missing split, or one without the
    labels its role needs, is one sentence now rather than later."""
    for role in roles:
      self.num_examples(self.split(role))

  @property
  def info(self) -> DatasetInfo:
    """The facts (mean and std as the config sets them) and the pretraining
    split's size; raises if not prepared."""
    mean, std = catalog.normalisation(self.fields)
    return DatasetInfo(
        name=self.name,
        num_train_examples=self.num_examples(self.split(PRETRAIN)),
        num_classes=self.facts.num_classes,
        image_size=self.facts.image_size, mean=mean, std=std, channels=3,
        eval_crop_fraction=self.facts.eval_crop_fraction)

  @abc.abstractmethod
  def num_examples(self, split: Split) -> int:
    """Number of examples in ``split``."""

  def steps_per_epoch(self, split: Split, global_batch_size: int) -> int:
    """Global batches per epoch of ``train_stream``: the whole batches in
    ``split``, whatever the number of processes (each process's part of a
    TFDS split holds whole local batches of every global one)."""
    return streams.steps_per_epoch(self.num_examples(split),
                                   global_batch_size, split.name)

  @abc.abstractmethod
  def train_stream(self, split: Split, *, global_batch_size: int,
                   start_step: int, shuffle_seed: int, process_index: int,
                   process_count: int) -> tf.data.Dataset:
    """This process's infinite {'image', 'label', 'key'}, training order.

    Its examples of global batches ``start_step``, ``start_step + 1``, ...:
    ``global_batch_size / process_count`` of each, ``key`` an int64 unique
    over all processes and epochs (see ``streams``).
    """

  @abc.abstractmethod
  def eval_examples(self, split: Split, *, local_batch: int,
                    process_index: int,
                    process_count: int) -> tf.data.Dataset:
    """This process's share of ``split`` once: {'image', 'label'}.

    The shares of all processes cover the split exactly once, and none has
    more than ``streams.padded_length`` examples.
    """

  def eval_pass(self, split: Split, *, local_batch: int, process_index: int,
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
