"""Images in a folder as torchvision's ``ImageFolder`` reads them
(``data_dir/train/CLASS/*``, ``data_dir/val/CLASS/*``; unlabelled images
directly in ``train/``), any size, JPEG or PNG; splits are the folder names
(listing and labels: ``folders``)."""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np
import tensorflow as tf

from eqco_jax.core.errors import UserError
from eqco_jax.data import catalog
from eqco_jax.data import folders
from eqco_jax.data import streams
from eqco_jax.data import unreadable
from eqco_jax.data.catalog import Facts
from eqco_jax.data.sources.base import PRETRAIN, Source, Split
from eqco_jax.data.tfdata import as_written


def read_image_file(path: tf.Tensor, *, url: bool) -> tf.Tensor:
  """The bytes of one image file: local (TensorFlow's reader) or a URL
  (fsspec, e.g. gs://)."""
  if url:
    data = tf.numpy_function(folders.read_url, [path], tf.string,
                             stateful=False)
    return tf.ensure_shape(data, [])
  return tf.io.read_file(path)


class ImageFolderSource(Source):
  """A folder of images (see the module's doc).

  A split's list of files is random access: training epochs are
  permutations of the whole split (``streams.permuted_rows``), the same
  global batches for any number of processes, each process reading only
  the files of its part of each batch, and a resume reading no file it does
  not use. A split read with ``labelled_only`` (the evaluation roles) holds
  the images in class folders only. A file that cannot be read or decoded
  is skipped and counted like an unreadable record.
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._lists: dict[str, tuple[list[str], np.ndarray]] = {}
    self._split_examples: dict[
        Split, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

  @property
  def root(self) -> str:
    return catalog.image_folder_root(self.fields)

  def _default_splits(self) -> tuple[str, str, str]:
    """Known without listing (the facts also hold the classes, which are
    listed from the pretraining split)."""
    return self._facts.splits

  def images(self, folder: str) -> list[str]:
    """The images of ``ROOT/<folder>``, listed once (and kept)."""
    return self._listed(folder)[0]

  def _listed(self, folder: str) -> tuple[list[str], np.ndarray]:
    """The images of ``ROOT/<folder>`` and their sizes (int64, -1 where a
    list kept before sizes were does not say)."""
    if folder not in self._lists:
      where = folders.split_folder(self.root, folder)
      if not folders.is_url(where) and not os.path.isdir(where):
        raise UserError(
            f"{where}, a split of this run, is not a folder (moved or "
            "deleted since the run listed it?); put it back, or set "
            "config.data_dir to where it is.")
      make = functools.partial(folders.list_images, self.root, folder)
      entries = self._keep_list(folder, make) if self._keep_list else make()
      self._lists[folder] = (
          [e if isinstance(e, str) else e[0] for e in entries],
          np.asarray([-1 if isinstance(e, str) else e[1] for e in entries],
                     np.int64))
    return self._lists[folder]

  @functools.cached_property
  def classes(self) -> tuple[str, ...]:
    """The class folders of the pretraining split, sorted (label order)."""
    return folders.classes_of(self.images(self.split(PRETRAIN).name))

  @functools.cached_property
  def facts(self) -> Facts:
    return dataclasses.replace(self._facts, num_classes=len(self.classes))

  def _examples(self, split: Split
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Relative paths (object array), labels int32 and sizes int64 of
    ``split``."""
    if split not in self._split_examples:
      self._split_examples[split] = self._list_examples(split)
    return self._split_examples[split]

  def _list_examples(self, split: Split
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images, sizes = self._listed(split.name)
    where = folders.split_folder(self.root, split.name)
    labels = folders.labels_of(images, self.classes, folder=where)
    if not split.labelled_only:
      return np.asarray(images, object), labels, sizes
    kept = labels != folders.UNLABELLED
    if not kept.any():
      raise UserError(
          f"The kNN monitor and the linear evaluation need labelled images, "
          f"and {where} has none in class folders; put them in "
          f"{where}/CLASS/, or pretrain without evaluation "
          "(config.final_eval=False, config.eval_every_steps=-1).")
    return np.asarray(images, object)[kept], labels[kept], sizes[kept]

  def num_examples(self, split: Split) -> int:
    return len(self._examples(split)[0])

  def _read(self, split: Split, rows: tf.data.Dataset) -> tf.data.Dataset:
    """{'index', ...} -> {'image': the file's bytes ('' when it cannot be
    read, or its size is not the one listed), 'label', 'id': its path in the
    split, ...}."""
    paths, labels, sizes = self._examples(split)
    prefix = folders.split_folder(self.root, split.name) + "/"
    url = folders.is_url(prefix)
    paths = tf.constant(paths.astype(str))
    labels, sizes = tf.constant(labels), tf.constant(sizes)

    def read(row: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
      relative = tf.gather(paths, row["index"])
      image, _ = unreadable.decode_or_flag(
          functools.partial(read_image_file, url=url), prefix + relative)
      size = tf.gather(sizes, row["index"])
      changed = tf.logical_and(size >= 0, tf.cast(
          tf.strings.length(image), tf.int64) != size)
      image = tf.where(changed, tf.constant(""), image)
      rest = {k: v for k, v in row.items() if k != "index"}
      return {"image": image, "label": tf.gather(labels, row["index"]),
              "id": relative, **rest}

    return rows.map(as_written(read), num_parallel_calls=tf.data.AUTOTUNE)

  def train_stream(self, split: Split, *, global_batch_size: int,
                   start_step: int, shuffle_seed: int, process_index: int,
                   process_count: int) -> tf.data.Dataset:
    return self._read(split, streams.permuted_rows(
        self.num_examples(split), split=split.name,
        global_batch_size=global_batch_size, start_step=start_step,
        shuffle_seed=shuffle_seed, process_index=process_index,
        process_count=process_count))

  def eval_examples(self, split: Split, *, local_batch: int,
                    process_index: int,
                    process_count: int) -> tf.data.Dataset:
    rows = streams.batch_slice_rows(
        self.num_examples(split), local_batch=local_batch,
        process_index=process_index, process_count=process_count)
    return self._read(split,
                      tf.data.Dataset.from_tensor_slices({"index": rows}))
