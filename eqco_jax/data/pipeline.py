"""Input pipelines: two-view pretraining batches and evaluation batches.

Every function takes the run's ``sources.Source`` (built once, from the
config's data fields, ``source.fields``): each process runs one tf.data
pipeline over its own part of the split (the source decides which) and
feeds ``batch_size / process_count`` examples of every global batch; ``pretrain_batches`` /
``eval_batches`` assemble those parts into global ``jax.Array``s sharded on
the mesh's ``data`` axis and keep two batches in flight to the devices.

Determinism: the order of examples and every random draw are functions of
the ``seed`` field and the step, never of time or thread scheduling, so
``start_step=s`` yields exactly the batches a run from step 0 yields from its
s-th batch on. Each example's augmentation is keyed on its position in the
stream (``streams``).
"""

from __future__ import annotations

import collections
import itertools
from typing import Any, Callable, Iterator

import jax
import numpy as np
import tensorflow as tf

from eqco_jax.core import sharding
from eqco_jax.core.errors import UserError
from eqco_jax.data import augment as augment_lib
from eqco_jax.data import catalog
from eqco_jax.data import sources
from eqco_jax.data import unreadable
from eqco_jax.data.streams import local_batch_size
from eqco_jax.data.tfdata import as_written, deterministic

# Purposes of the seeds derived from the ``seed`` field.
_PRETRAIN_AUGMENT, _PRETRAIN_SHUFFLE = 0, 1
_EVAL_AUGMENT, _EVAL_SHUFFLE = 2, 3

Batch = dict[str, np.ndarray]
# on_skipped(step, record ids): this process's unreadable records in the
# batch of (1-based) ``step``, whose places other images of it took.
OnSkipped = Callable[[int, list[str]], None]


# ----------------------------------------------------------------- helpers.


def derived_seed(seed: int, purpose: int) -> int:
  """A non-negative int64 seed for one purpose, derived from the run seed."""
  state = np.random.SeedSequence([seed, purpose]).generate_state(1, np.uint64)
  return int(state[0] >> np.uint64(1))


def _processes(process_index: int | None,
               process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise UserError(f"process_index={index} is outside [0, {count}).")
  return index, count


def eval_split(source: sources.Source, split: str) -> sources.Split:
  """The split of the evaluation split 'train' or 'test'."""
  roles = {"train": sources.EVAL_TRAIN, "test": sources.EVAL_TEST}
  if split not in roles:
    raise UserError(f"Evaluation split must be 'train' or 'test', not "
                    f"{split!r}.")
  return source.split(roles[split])


def num_eval_examples(source: sources.Source, split: str) -> int:
  """Examples in the evaluation split 'train' or 'test'."""
  return source.num_examples(eval_split(source, split))


def _example_seed(seed: int, key: tf.Tensor) -> tf.Tensor:
  return tf.stack([tf.constant(seed, tf.int64), tf.cast(key, tf.int64)])


# ------------------------------------------------------------- pretraining.


def pretrain_views(dataset: tf.data.Dataset, fields: catalog.DataFields,
                   local_batch: int, device_batch: int | None = None
                   ) -> tf.data.Dataset:
  """Keyed examples -> batches {'view1', 'view2'} uint8 [local_batch, S, S, 3]
  and 'skipped' string [local_batch]: the record id (or key) of an
  unreadable image whose place another example of the batch took, else ''.
  That example comes from the same ``device_batch`` consecutive rows (one
  device's; default: the whole local batch).

  Crops and flips per example; the color stage per batch, on the host
  unless ``fields.augment.on_device``.
  """
  aug = fields.augment
  seed = derived_seed(fields.seed, _PRETRAIN_AUGMENT)
  color_on_host = not aug.on_device
  encoded = dataset.element_spec["image"].dtype == tf.string

  def two_views(example: dict[str, tf.Tensor]) -> dict[str, Any]:
    views = {}
    view_seeds = augment_lib.split_seed(_example_seed(seed, example["key"]), 2)
    for v, view_seed in enumerate(view_seeds, start=1):
      crop_seed, color_seed = augment_lib.split_seed(view_seed, 2)
      views[f"view{v}"] = augment_lib.random_resized_crop_flip(
          example["image"], crop_seed, size=fields.image_size,
          scale=tuple(aug.crop_scale), ratio=tuple(aug.crop_ratio),
          flip_prob=aug.flip_prob)
      if color_on_host:
        views[f"color{v}"] = augment_lib.sample_color_params(color_seed, aug)
    return views

  def checked_views(example: dict[str, tf.Tensor]) -> dict[str, Any]:
    """The views, and the record's name if its image cannot be decoded."""
    if not encoded:  # Arrays in memory: nothing to decode.
      return {**two_views(example), "skipped": tf.constant("")}
    views, readable = unreadable.decode_or_flag(two_views, example)
    name = example.get("id", tf.strings.as_string(example["key"]))
    return {**views, "skipped": tf.where(readable, "", name)}

  def fill(batch: dict[str, Any]) -> dict[str, Any]:
    filled = unreadable.fill_rows(
        {"view1": batch["view1"], "view2": batch["view2"]},
        tf.equal(batch["skipped"], ""), device_batch)
    return {**batch, **filled}

  def color(batch: dict[str, Any]) -> dict[str, tf.Tensor]:
    return {**{f"view{v}": augment_lib.color_augment_batch(
        batch[f"view{v}"], batch[f"color{v}"], aug) for v in (1, 2)},
            "skipped": batch["skipped"]}

  ds = dataset.map(as_written(checked_views),
                   num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True)
  if encoded:
    ds = ds.map(as_written(fill), num_parallel_calls=tf.data.AUTOTUNE)
  if color_on_host:
    ds = ds.map(as_written(color), num_parallel_calls=tf.data.AUTOTUNE)
  return ds


def _report_skipped(batches: Iterator[Batch], start_step: int,
                    on_skipped: OnSkipped | None) -> Iterator[Batch]:
  """``batches`` without their 'skipped' field, whose record ids go to
  ``on_skipped`` with the (1-based) step of their batch."""
  for step, batch in enumerate(batches, start=start_step + 1):
    records = [r.decode() for r in batch.pop("skipped") if r]
    if records and on_skipped is not None:
      on_skipped(step, records)
    yield batch


def pretrain_dataset(source: sources.Source, *, start_step: int = 0,
                     process_index: int | None = None,
                     process_count: int | None = None,
                     device_count: int | None = None) -> tf.data.Dataset:
  """This process's pretraining batches of ``source`` (see
  ``pretrain_views``), from global step ``start_step`` on.

  With ``device_count`` (all processes' devices), an unreadable image's
  place is taken within its device's rows: the global batch is then the same
  for any split of those devices among processes. Without it, within this
  process's rows.
  """
  fields = source.fields
  index, count = _processes(process_index, process_count)
  device_batch = (None if device_count is None
                  else max(1, fields.batch_size // device_count))
  stream = source.train_stream(
      source.split(sources.PRETRAIN), global_batch_size=fields.batch_size,
      start_step=start_step,
      shuffle_seed=derived_seed(fields.seed, _PRETRAIN_SHUFFLE),
      process_index=index, process_count=count)
  ds = pretrain_views(stream, fields,
                      local_batch_size(fields.batch_size, count), device_batch)
  return deterministic(ds.prefetch(tf.data.AUTOTUNE))


def pretrain_batches(source: sources.Source, mesh: jax.sharding.Mesh, *,
                     start_step: int = 0,
                     on_skipped: OnSkipped | None = None
                     ) -> Iterator[dict[str, jax.Array]]:
  """Global pretraining batches {'view1', 'view2'}: uint8 [B, S, S, 3].

  Sharded with ``sharding.batch_sharding(mesh)``; B = the fields'
  ``batch_size``. This process's unreadable records go to ``on_skipped``
  when their batch is read (up to two steps ahead of training).
  """
  sharding.check_divisible(source.fields.batch_size, mesh)
  batches = pretrain_dataset(source, start_step=start_step,
                             device_count=mesh.devices.size)
  return prefetch_to_device(_report_skipped(
      batches.as_numpy_iterator(), start_step, on_skipped), mesh)


# -------------------------------------------------------------- evaluation.


def _train_view(fields: catalog.DataFields, example: dict[str, Any]
                ) -> dict[str, tf.Tensor]:
  """Linear-evaluation training view of a keyed example; ``mask`` False (a
  zero image) where the image cannot be decoded."""
  aug = fields.augment

  def view(image: tf.Tensor) -> tf.Tensor:
    return augment_lib.random_resized_crop_flip(
        image,
        _example_seed(derived_seed(fields.seed, _EVAL_AUGMENT),
                      example["key"]),
        size=fields.image_size, scale=tuple(aug.eval_crop_scale),
        ratio=tuple(aug.crop_ratio), flip_prob=aug.flip_prob)

  if example["image"].dtype == tf.string:
    image, readable = unreadable.decode_or_flag(view, example["image"])
  else:
    image, readable = view(example["image"]), tf.constant(True)
  return {"image": image, "label": example["label"], "mask": readable}


def eval_dataset(source: sources.Source, *, split: str, augment: bool,
                 batch_size: int, start_step: int = 0,
                 process_index: int | None = None,
                 process_count: int | None = None) -> tf.data.Dataset:
  """This process's evaluation batches {'image', 'label', 'mask'} of
  ``batch_size / process_count`` examples (``batch_size`` is global).

  ``augment=False``: one pass over the split, test view (centre crop), the
  last batch padded, ``mask`` False on padding. ``augment=True``: infinite,
  linear-evaluation training view (RandomResizedCrop ``eval_crop_scale``,
  flip), deterministic in seed and ``start_step``.
  """
  fields = source.fields
  index, count = _processes(process_index, process_count)
  local_batch = local_batch_size(batch_size, count)
  split_name = eval_split(source, split)
  if augment:
    ds = source.train_stream(
        split_name, global_batch_size=batch_size, start_step=start_step,
        shuffle_seed=derived_seed(fields.seed, _EVAL_SHUFFLE),
        process_index=index, process_count=count)
    ds = ds.map(as_written(lambda example: _train_view(fields, example)),
                num_parallel_calls=tf.data.AUTOTUNE)
  else:
    crop_fraction = source.facts.eval_crop_fraction
    ds = source.eval_pass(
        split_name, local_batch=local_batch, process_index=index,
        process_count=count,
        preprocess=lambda image: augment_lib.center_crop_resize(
            image, size=fields.image_size, crop_fraction=crop_fraction))
  ds = ds.batch(local_batch, drop_remainder=True)
  return deterministic(ds.prefetch(tf.data.AUTOTUNE))


def eval_batches(source: sources.Source, mesh: jax.sharding.Mesh, *,
                 split: str, augment: bool, batch_size: int,
                 start_step: int = 0) -> Iterator[dict[str, jax.Array]]:
  """Global evaluation batches {'image' uint8, 'label' int32, 'mask' bool}
  (see ``eval_dataset``), leading axis ``batch_size``, sharded on the mesh's
  data axis."""
  sharding.check_divisible(batch_size, mesh)
  return prefetch_to_device(eval_dataset(
      source, split=split, augment=augment, batch_size=batch_size,
      start_step=start_step).as_numpy_iterator(), mesh)


# ------------------------------------------------------- device prefetch.


def prefetch_to_device(batches: Iterator[Batch], mesh: jax.sharding.Mesh,
                       size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Global arrays of ``batches``, ``size`` of them already sent ahead."""
  queue = collections.deque()

  def enqueue(n: int) -> None:
    for batch in itertools.islice(batches, n):
      queue.append(jax.tree.map(
          lambda x: sharding.to_global_array(x, mesh), batch))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)
