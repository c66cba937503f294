"""Input pipelines: two-view pretraining batches and evaluation batches.

Each process runs one tf.data pipeline over its own disjoint part of the
split and feeds ``batch_size / process_count`` examples of every global
batch; ``pretrain_batches`` / ``eval_batches`` assemble those parts into
global ``jax.Array``s sharded on the mesh's ``data`` axis and keep two
batches in flight to the devices.

Determinism: the order of examples and every random draw are functions of
``config.seed`` and the step, never of time or thread scheduling, so
``start_step=s`` yields exactly the batches a run from step 0 yields from its
s-th batch on. Epoch e is shuffled with a seed derived from (seed, e); each
example's augmentation is keyed on its position in the stream. Resuming skips
whole epochs for free and, within the epoch, skips undecoded records.
For in-memory data (the digits) the global batch is moreover the same for
any number of processes: one global permutation per epoch, each process
taking its contiguous slice of every global batch, and augmentation keyed on
the global example position.
"""

from __future__ import annotations

import collections
import itertools
import math
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from eqco_jax import augment as augment_lib
from eqco_jax import datasets
from eqco_jax import sharding
from eqco_jax.errors import UserError

# Purposes of the seeds derived from ``config.seed``.
_PRETRAIN_AUGMENT, _PRETRAIN_SHUFFLE = 0, 1
_EVAL_AUGMENT, _EVAL_SHUFFLE = 2, 3
_NO_END = 2**62  # End of the (practically) infinite range of epochs.

Batch = dict[str, np.ndarray]


def default_augment_config() -> ml_collections.ConfigDict:
  """MoCo v2 ImageNet augmentation; small-image recipes override fields."""
  return ml_collections.ConfigDict({
      "crop_scale": (0.2, 1.0),
      "crop_ratio": (3.0 / 4.0, 4.0 / 3.0),
      "flip_prob": 0.5,
      "color_jitter_prob": 0.8,
      "brightness": 0.4,
      "contrast": 0.4,
      "saturation": 0.4,
      "hue": 0.1,
      "grayscale_prob": 0.2,
      "blur_prob": 0.5,
      "blur_sigma": (0.1, 2.0),
      "blur_kernel_fraction": 0.1,
      "blur_before_grayscale": False,  # True: SiMo's order.
      "on_device": False,
      "eval_crop_scale": (0.08, 1.0),  # Linear-evaluation training crops.
  })


def default_config() -> ml_collections.ConfigDict:
  """Every data field the pipelines read, set for the embedded digits."""
  return ml_collections.ConfigDict({
      "dataset": datasets.DIGITS,
      "data_dir": None,
      "manual_dir": None,  # ImageNet tars, only used with download=True.
      "download": False,
      "train_split": None,  # None: the dataset's default split.
      "eval_train_split": None,
      "eval_test_split": None,
      "image_size": datasets.DIGITS_NATIVE_SIZE,
      "batch_size": 256,  # Global, over all processes.
      "eval_batch_size": 256,
      "seed": 0,
      "shuffle_buffer": 10_000,
      "augment": default_augment_config(),
  })


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


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  """Examples per process of each global batch; raises unless it divides."""
  if global_batch_size % process_count:
    raise UserError(
        f"Global batch size {global_batch_size} is not divisible by the "
        f"{process_count} processes; choose a multiple of {process_count}.")
  return global_batch_size // process_count


def _deterministic(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def _eval_split(config: ml_collections.ConfigDict, split: str) -> str:
  roles = {"train": datasets.EVAL_TRAIN, "test": datasets.EVAL_TEST}
  if split not in roles:
    raise UserError(f"Evaluation split must be 'train' or 'test', not "
                    f"{split!r}.")
  return datasets.split_name(config, roles[split])


# ------------------------------------------- infinite, keyed example streams.


def _steps_per_epoch(num_examples: int, batch_size: int, split: str) -> int:
  steps = num_examples // batch_size
  if not steps:
    raise UserError(f"Split {split!r} has {num_examples} examples (per "
                    f"process), fewer than one batch of {batch_size}; use "
                    f"a smaller batch size.")
  return steps


def _in_memory_stream(images: np.ndarray, labels: np.ndarray, *, split: str,
                      global_batch_size: int, start_step: int,
                      shuffle_seed: int, process_index: int,
                      process_count: int) -> tf.data.Dataset:
  """This process's examples of global batches start_step, start_step+1, ...

  Epoch e is a permutation of all examples seeded by (shuffle_seed, e); its
  step j is the permutation's j-th run of ``global_batch_size``, of which
  this process takes its contiguous slice. Keys are global positions.
  """
  num = len(images)
  steps = _steps_per_epoch(num, global_batch_size, split)
  local = local_batch_size(global_batch_size, process_count)
  first = process_index * local
  start_epoch = start_step // steps

  def epoch_rows(epoch: tf.Tensor) -> tf.data.Dataset:
    order = tf.random.experimental.stateless_shuffle(
        tf.range(num, dtype=tf.int64),
        seed=tf.stack([tf.constant(shuffle_seed, tf.int64), epoch]))
    rows = tf.reshape(order[:steps * global_batch_size],
                      (steps, global_batch_size))[:, first:first + local]
    step = epoch * steps + tf.range(steps, dtype=tf.int64)
    return tf.data.Dataset.from_tensor_slices((step, rows))

  def examples(step: tf.Tensor, rows: tf.Tensor) -> tf.data.Dataset:
    keys = step * global_batch_size + first + tf.range(local, dtype=tf.int64)
    return tf.data.Dataset.from_tensor_slices({"index": rows, "key": keys})

  images, labels = tf.constant(images), tf.constant(labels, tf.int32)

  def gather(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return {"image": tf.gather(images, ex["index"]),
            "label": tf.gather(labels, ex["index"]), "key": ex["key"]}

  ds = tf.data.Dataset.range(start_epoch, _NO_END).flat_map(epoch_rows)
  ds = ds.skip(start_step - start_epoch * steps).flat_map(examples)
  return ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE)


def _tfds_stream(config: ml_collections.ConfigDict, split: str, *,
                 local_batch: int, start_step: int, shuffle_seed: int,
                 process_index: int, process_count: int) -> tf.data.Dataset:
  """This process's examples of batches start_step, start_step+1, ...

  The process reads its equal part of the split (a remainder of fewer than
  ``process_count`` examples is dropped); epoch e passes it through a shuffle
  buffer seeded by (shuffle_seed, e) and keeps whole batches.
  """
  part = datasets.process_split(split, process_index, process_count,
                                drop_remainder=True)
  steps = _steps_per_epoch(datasets.num_examples(config, part), local_batch,
                           split)
  epoch_len = steps * local_batch
  records = datasets.tfds_dataset(config, part)

  def epoch_examples(epoch: tf.Tensor) -> tf.data.Dataset:
    seed = tf.random.stateless_uniform(
        [], tf.stack([tf.constant(shuffle_seed, tf.int64), epoch]),
        minval=None, maxval=None, dtype=tf.int64)
    shuffled = records.shuffle(config.shuffle_buffer, seed=seed)
    first = (epoch * process_count + process_index) * epoch_len
    keys = tf.data.Dataset.range(first, first + epoch_len)
    return tf.data.Dataset.zip(shuffled.take(epoch_len), keys).map(
        lambda ex, key: {**ex, "key": key})

  start_epoch = start_step // steps
  ds = tf.data.Dataset.range(start_epoch, _NO_END).flat_map(epoch_examples)
  return ds.skip((start_step - start_epoch * steps) * local_batch)


def _train_stream(config: ml_collections.ConfigDict, split: str, *,
                  global_batch_size: int, start_step: int, shuffle_seed: int,
                  process_index: int, process_count: int) -> tf.data.Dataset:
  """Infinite {'image', 'label', 'key'} examples in training order."""
  if datasets.is_in_memory(config):
    images, labels = datasets.digits_split(split, config.image_size)
    return _in_memory_stream(
        images, labels, split=split, global_batch_size=global_batch_size,
        start_step=start_step, shuffle_seed=shuffle_seed,
        process_index=process_index, process_count=process_count)
  return _tfds_stream(
      config, split,
      local_batch=local_batch_size(global_batch_size, process_count),
      start_step=start_step, shuffle_seed=shuffle_seed,
      process_index=process_index, process_count=process_count)


def pretrain_steps_per_epoch(config: ml_collections.ConfigDict,
                             process_count: int | None = None) -> int:
  """Global batches per pass over the pretraining split."""
  _, count = _processes(0, process_count)
  split = datasets.split_name(config, datasets.PRETRAIN)
  if datasets.is_in_memory(config):
    return _steps_per_epoch(datasets.num_examples(config, split),
                            config.batch_size, split)
  part = datasets.process_split(split, 0, count, drop_remainder=True)
  return _steps_per_epoch(datasets.num_examples(config, part),
                          local_batch_size(config.batch_size, count), split)


# ------------------------------------------------------------- pretraining.


def _example_seed(seed: int, key: tf.Tensor) -> tf.Tensor:
  return tf.stack([tf.constant(seed, tf.int64), tf.cast(key, tf.int64)])


def pretrain_views(dataset: tf.data.Dataset, config: ml_collections.ConfigDict,
                   local_batch: int) -> tf.data.Dataset:
  """Keyed examples -> batches {'view1', 'view2'} uint8 [local_batch, S, S, 3].

  Crops and flips per example; the colour stage per batch, on the host
  unless ``config.augment.on_device``.
  """
  aug = config.augment
  seed = derived_seed(config.seed, _PRETRAIN_AUGMENT)
  colour_on_host = not aug.on_device

  def two_views(example: dict[str, tf.Tensor]) -> dict[str, Any]:
    views = {}
    view_seeds = augment_lib.split_seed(_example_seed(seed, example["key"]), 2)
    for v, view_seed in enumerate(view_seeds, start=1):
      crop_seed, colour_seed = augment_lib.split_seed(view_seed, 2)
      views[f"view{v}"] = augment_lib.random_resized_crop_flip(
          example["image"], crop_seed, size=config.image_size,
          scale=tuple(aug.crop_scale), ratio=tuple(aug.crop_ratio),
          flip_prob=aug.flip_prob)
      if colour_on_host:
        views[f"colour{v}"] = augment_lib.sample_color_params(colour_seed, aug)
    return views

  def colour(batch: dict[str, Any]) -> dict[str, tf.Tensor]:
    return {f"view{v}": augment_lib.color_augment_batch(
        batch[f"view{v}"], batch[f"colour{v}"], aug) for v in (1, 2)}

  ds = dataset.map(two_views, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True)
  if colour_on_host:
    ds = ds.map(colour, num_parallel_calls=tf.data.AUTOTUNE)
  return ds


def pretrain_dataset(config: ml_collections.ConfigDict, *,
                     start_step: int = 0, process_index: int | None = None,
                     process_count: int | None = None) -> tf.data.Dataset:
  """This process's pretraining batches, from global step ``start_step`` on."""
  index, count = _processes(process_index, process_count)
  stream = _train_stream(
      config, datasets.split_name(config, datasets.PRETRAIN),
      global_batch_size=config.batch_size, start_step=start_step,
      shuffle_seed=derived_seed(config.seed, _PRETRAIN_SHUFFLE),
      process_index=index, process_count=count)
  ds = pretrain_views(stream, config,
                      local_batch_size(config.batch_size, count))
  return _deterministic(ds.prefetch(tf.data.AUTOTUNE))


def pretrain_batches_numpy(config: ml_collections.ConfigDict, *,
                           start_step: int = 0,
                           process_index: int | None = None,
                           process_count: int | None = None
                           ) -> Iterator[Batch]:
  """This process's pretraining batches as numpy {'view1', 'view2'}."""
  return pretrain_dataset(config, start_step=start_step,
                          process_index=process_index,
                          process_count=process_count).as_numpy_iterator()


def pretrain_batches(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                     *, start_step: int = 0, process_index: int | None = None,
                     process_count: int | None = None
                     ) -> Iterator[dict[str, jax.Array]]:
  """Global pretraining batches {'view1', 'view2'}: uint8 [B, S, S, 3].

  Sharded with ``sharding.batch_sharding(mesh)``; B = ``config.batch_size``.
  """
  sharding.check_divisible(config.batch_size, mesh)
  return prefetch_to_device(
      pretrain_batches_numpy(config, start_step=start_step,
                             process_index=process_index,
                             process_count=process_count), mesh)


# -------------------------------------------------------------- evaluation.


def num_eval_examples(config: ml_collections.ConfigDict, split: str) -> int:
  """Examples in the evaluation split 'train' or 'test'."""
  return datasets.num_examples(config, _eval_split(config, split))


def _single_pass(config: ml_collections.ConfigDict, split: str, *,
                 local_batch: int, process_index: int, process_count: int,
                 preprocess: Callable[[tf.Tensor], tf.Tensor]
                 ) -> tf.data.Dataset:
  """Every example of ``split`` once, padded to whole batches and masked.

  Every process yields ceil(N / global batch) batches.
  """
  num = datasets.num_examples(config, split)
  global_batch = local_batch * process_count
  padded_len = math.ceil(num / global_batch) * local_batch

  if datasets.is_in_memory(config):
    images, labels = datasets.digits_split(split, config.image_size)
    images, labels = tf.constant(images), tf.constant(labels, tf.int32)

    def example(i: tf.Tensor) -> dict[str, tf.Tensor]:
      index = ((i // local_batch) * global_batch + process_index * local_batch
               + i % local_batch)
      valid = index < num
      index = tf.minimum(index, num - 1)
      image = preprocess(tf.gather(images, index))
      return {"image": image * tf.cast(valid, image.dtype),
              "label": tf.gather(labels, index) * tf.cast(valid, tf.int32),
              "mask": valid}

    ds = tf.data.Dataset.range(padded_len).map(
        example, num_parallel_calls=tf.data.AUTOTUNE)
  else:
    part = datasets.process_split(split, process_index, process_count,
                                  drop_remainder=False)
    ds = datasets.tfds_dataset(config, part).map(
        lambda ex: {"image": preprocess(ex["image"]), "label": ex["label"],
                    "mask": tf.constant(True)},
        num_parallel_calls=tf.data.AUTOTUNE)
    size = config.image_size
    padding = tf.data.Dataset.from_tensors({
        "image": tf.zeros((size, size, 3), tf.uint8),
        "label": tf.constant(0, tf.int32), "mask": tf.constant(False)})
    ds = ds.concatenate(padding.repeat()).take(padded_len)
  return ds.batch(local_batch, drop_remainder=True)


def eval_dataset(config: ml_collections.ConfigDict, *, split: str,
                 augment: bool, start_step: int = 0,
                 process_index: int | None = None,
                 process_count: int | None = None) -> tf.data.Dataset:
  """This process's evaluation batches {'image', 'label', 'mask'}.

  ``augment=False``: one pass over the split, test view (centre crop), the
  last batch padded, ``mask`` False on padding. ``augment=True``: infinite,
  linear-evaluation training view (RandomResizedCrop ``eval_crop_scale``,
  flip), deterministic in seed and ``start_step``.
  """
  index, count = _processes(process_index, process_count)
  local_batch = local_batch_size(config.eval_batch_size, count)
  split_name = _eval_split(config, split)
  size = config.image_size
  if not augment:
    crop_fraction = datasets.get_info(config).eval_crop_fraction
    ds = _single_pass(
        config, split_name, local_batch=local_batch, process_index=index,
        process_count=count,
        preprocess=lambda image: augment_lib.center_crop_resize(
            image, size=size, crop_fraction=crop_fraction))
    return _deterministic(ds.prefetch(tf.data.AUTOTUNE))

  aug = config.augment
  seed = derived_seed(config.seed, _EVAL_AUGMENT)

  def train_view(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image = augment_lib.random_resized_crop_flip(
        example["image"], _example_seed(seed, example["key"]), size=size,
        scale=tuple(aug.eval_crop_scale), ratio=tuple(aug.crop_ratio),
        flip_prob=aug.flip_prob)
    return {"image": image, "label": example["label"],
            "mask": tf.constant(True)}

  stream = _train_stream(
      config, split_name, global_batch_size=config.eval_batch_size,
      start_step=start_step,
      shuffle_seed=derived_seed(config.seed, _EVAL_SHUFFLE),
      process_index=index, process_count=count)
  ds = stream.map(train_view, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True)
  return _deterministic(ds.prefetch(tf.data.AUTOTUNE))


def eval_batches_numpy(config: ml_collections.ConfigDict, *, split: str,
                       augment: bool, start_step: int = 0,
                       process_index: int | None = None,
                       process_count: int | None = None) -> Iterator[Batch]:
  """This process's evaluation batches as numpy dicts."""
  return eval_dataset(config, split=split, augment=augment,
                      start_step=start_step, process_index=process_index,
                      process_count=process_count).as_numpy_iterator()


def eval_batches(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                 *, split: str, augment: bool, start_step: int = 0,
                 process_index: int | None = None,
                 process_count: int | None = None
                 ) -> Iterator[dict[str, jax.Array]]:
  """Global evaluation batches {'image' uint8, 'label' int32, 'mask' bool}.

  Leading axis ``config.eval_batch_size``, sharded on the mesh's data axis.
  """
  sharding.check_divisible(config.eval_batch_size, mesh)
  return prefetch_to_device(
      eval_batches_numpy(config, split=split, augment=augment,
                         start_step=start_step, process_index=process_index,
                         process_count=process_count), mesh)


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
