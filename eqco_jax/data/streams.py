"""The order, keys and padding of examples: functions of seeds and steps only.

Sources call these to turn their examples into the two kinds of stream the
pipelines read:

* training: infinite {'image', 'label', 'key'} in training order, epoch e
  shuffled with a seed derived from (shuffle_seed, e), ``key`` the example's
  position in the stream (what its augmentation is seeded on), starting at
  global step ``start_step`` exactly where a run from step 0 would be then;
* evaluation: every example of a split once, then zero padding (``mask``
  False) up to a whole number of batches.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import tensorflow as tf

from eqco_jax.core.errors import UserError
from eqco_jax.data import unreadable
from eqco_jax.data.tfdata import as_written

_NO_END = 2**62  # End of the (practically) infinite range of epochs.

Example = dict[str, tf.Tensor]


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  """Examples per process of each global batch; raises unless it divides."""
  if global_batch_size % process_count:
    raise UserError(
        f"Global batch size {global_batch_size} is not divisible by the "
        f"{process_count} processes; choose a multiple of {process_count}.")
  return global_batch_size // process_count


def steps_per_epoch(num_examples: int, batch_size: int, split: str) -> int:
  """Whole batches in ``num_examples``; raises if there is not even one."""
  steps = num_examples // batch_size
  if not steps:
    raise UserError(f"Split {split!r} has {num_examples} examples (per "
                    f"process), fewer than one batch of {batch_size}; use "
                    f"a smaller batch size.")
  return steps


def _epoch_seed(shuffle_seed: int, epoch: tf.Tensor) -> tf.Tensor:
  return tf.stack([tf.constant(shuffle_seed, tf.int64), epoch])


def permuted_rows(num: int, *, split: str, global_batch_size: int,
                  start_step: int, shuffle_seed: int, process_index: int,
                  process_count: int) -> tf.data.Dataset:
  """{'index', 'key'} of this process's examples of global batches
  start_step, start_step + 1, ... of a split of ``num`` random-access
  examples (in memory, or a list of files).

  Epoch e is a permutation of all ``num`` seeded by (shuffle_seed, e); its
  step j is the permutation's j-th run of ``global_batch_size``, of which
  this process takes its contiguous slice. Keys are global positions, so the
  global batch is the same for any number of processes, and a resume at any
  step computes its rows directly: nothing before them is read.
  """
  steps = steps_per_epoch(num, global_batch_size, split)
  local = local_batch_size(global_batch_size, process_count)
  first = process_index * local
  start_epoch = start_step // steps

  def epoch_rows(epoch: tf.Tensor) -> tf.data.Dataset:
    order = tf.random.experimental.stateless_shuffle(
        tf.range(num, dtype=tf.int64), seed=_epoch_seed(shuffle_seed, epoch))
    rows = tf.reshape(order[:steps * global_batch_size],
                      (steps, global_batch_size))[:, first:first + local]
    step = epoch * steps + tf.range(steps, dtype=tf.int64)
    return tf.data.Dataset.from_tensor_slices((step, rows))

  def examples(step: tf.Tensor, rows: tf.Tensor) -> tf.data.Dataset:
    keys = step * global_batch_size + first + tf.range(local, dtype=tf.int64)
    return tf.data.Dataset.from_tensor_slices({"index": rows, "key": keys})

  ds = tf.data.Dataset.range(start_epoch, _NO_END).flat_map(
      as_written(epoch_rows))
  return ds.skip(start_step - start_epoch * steps).flat_map(
      as_written(examples))


def permuted_epochs(images: np.ndarray, labels: np.ndarray, *, split: str,
                    global_batch_size: int, start_step: int,
                    shuffle_seed: int, process_index: int,
                    process_count: int) -> tf.data.Dataset:
  """In-memory examples ``images`` [N, ...], ``labels`` [N] (the whole
  split) of global batches start_step, start_step + 1, ... in the order of
  :func:`permuted_rows`."""
  return gather_rows(permuted_rows(
      len(images), split=split, global_batch_size=global_batch_size,
      start_step=start_step, shuffle_seed=shuffle_seed,
      process_index=process_index, process_count=process_count),
                     images, labels)


def buffer_shuffled_epochs(records: tf.data.Dataset, num_records: int, *,
                           split: str, local_batch: int, start_step: int,
                           shuffle_seed: int, shuffle_buffer: int,
                           process_index: int,
                           process_count: int) -> tf.data.Dataset:
  """This process's examples of batches start_step, start_step + 1, ...

  ``records`` ({'image', 'label'}, ``num_records`` of them, in a fixed
  order) is this process's part of the split. Epoch e passes it through a
  shuffle buffer seeded by (shuffle_seed, e) and keeps whole batches; keys
  number the epoch's examples of all processes. Resuming skips whole epochs
  for free and, within the epoch, skips examples before they are decoded.
  """
  steps = steps_per_epoch(num_records, local_batch, split)
  epoch_len = steps * local_batch

  def epoch_examples(epoch: tf.Tensor) -> tf.data.Dataset:
    seed = tf.random.stateless_uniform(
        [], _epoch_seed(shuffle_seed, epoch), minval=None, maxval=None,
        dtype=tf.int64)
    shuffled = records.shuffle(shuffle_buffer, seed=seed)
    first = (epoch * process_count + process_index) * epoch_len
    keys = tf.data.Dataset.range(first, first + epoch_len)
    return tf.data.Dataset.zip(shuffled.take(epoch_len), keys).map(
        as_written(lambda ex, key: {**ex, "key": key}))

  start_epoch = start_step // steps
  ds = tf.data.Dataset.range(start_epoch, _NO_END).flat_map(
      as_written(epoch_examples))
  return ds.skip((start_step - start_epoch * steps) * local_batch)


# A shard of a split: (file name, records to skip, records to take).
Shard = tuple[str, int, int]
# read_shard(file name, skip, take) -> its examples, {'image', 'label',
# 'id'}, records skip .. skip + take - 1 of the file.
ReadShard = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.data.Dataset]

# Stretches of shards a window reads at once (TFDS's own reader opens 16).
PARALLEL_READS = 16
# Rows copied out of a window at once as it is consumed: few (memory), but
# not one by one (35 us each, against 4 by 256).
GATHERED = 256


def window_bounds(num: int, window: int) -> list[int]:
  """Where :func:`sharded_epochs`' windows of an epoch of ``num`` records
  begin, and the end: ceil(num / window) windows of equal size, to a
  record."""
  count = -(-num // window)
  return [w * num // count for w in range(count + 1)]


def sharded_epochs(shards: list[Shard], read_shard: ReadShard, *, split: str,
                   local_batch: int, start_step: int, shuffle_seed: int,
                   window: int, process_index: int,
                   process_count: int) -> tf.data.Dataset:
  """This process's examples of batches start_step, start_step + 1, ...,
  from its part of the split, given as ``shards``.

  Epoch e reads the shards in an order drawn from (shuffle_seed, e): a
  stream of records cut into windows of at most ``window`` consecutive ones
  (:func:`window_bounds`), window w shuffled by a permutation drawn from
  (shuffle_seed, e, w). The examples that share a batch change across the
  whole split from epoch to epoch. Keys number the epoch's examples of all
  processes.

  A window is read as the stretches of shards it covers, up to
  ``PARALLEL_READS`` at once, interleaved in a fixed order (its order before
  the permutation depends on nothing else, not the threads' timing), and
  the next window, the next epoch's included, is read while one is
  consumed. A source that gives records faster than its consumer takes them
  keeps it waiting only for the first window (read whole before its first
  example), and at the edge after a window it did not use whole (a
  resume's first, an epoch's last when a remainder is dropped): windows
  differ in size by at most one record, so no other is quicker to consume
  than the next is to read.

  Memory: the reader holds two windows of records as read (still encoded),
  the one being consumed and the next; a window is permuted by index as it
  is consumed, never copied. An ImageNet window of 16,384 records is about
  1.8 GB of JPEGs: 3.6 GB per process, whatever the batch size.

  A resume at a step of epoch e opens no shard before the one where that
  step's window begins: it skips that shard's records before the window
  (without parsing them) and reads but does not use the window's records
  before the step, fewer than ``window``, however far into the epoch.
  """
  names = tf.constant([name for name, _, _ in shards])
  skips = tf.constant([skip for _, skip, _ in shards], tf.int64)
  takes = tf.constant([take for _, _, take in shards], tf.int64)
  num = sum(take for _, _, take in shards)
  steps = steps_per_epoch(num, local_batch, split)
  epoch_len = steps * local_batch
  start_epoch = start_step // steps
  start = (start_step - start_epoch * steps) * local_batch
  bounds = tf.constant(window_bounds(num, window), tf.int64)
  count = len(window_bounds(num, window)) - 1

  def epoch_windows(epoch: tf.Tensor) -> tf.data.Dataset:
    """(epoch, w, begin, end, lo, hi): the windows of ``epoch`` this stream
    uses, [begin, end) of the epoch's records, and the rows [lo, hi) of
    each's permutation it takes (from the resume's example on)."""
    first = tf.where(epoch == start_epoch, tf.constant(start, tf.int64),
                     tf.constant(0, tf.int64))
    begin, end = bounds[:-1], bounds[1:]
    lo = tf.maximum(first, begin) - begin
    hi = tf.minimum(end, epoch_len) - begin
    used = hi > lo
    return tf.data.Dataset.from_tensor_slices(tuple(
        tf.boolean_mask(x, used) for x in (
            tf.fill([count], epoch), tf.range(count, dtype=tf.int64), begin,
            end, lo, hi)))

  def stretches(epoch: tf.Tensor, begin: tf.Tensor,
                end: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """(names, skips, takes) [K] of the shard stretches that hold records
    [begin, end) of ``epoch``, in its order."""
    order = tf.random.experimental.stateless_shuffle(
        tf.range(tf.size(takes, out_type=tf.int64)),
        seed=_epoch_seed(shuffle_seed, epoch))
    sizes = tf.gather(takes, order)
    ends = tf.cumsum(sizes)  # of each shard in the epoch's stream
    starts = ends - sizes
    first, last = tf.maximum(starts, begin), tf.minimum(ends, end)
    covered = last > first
    return (tf.boolean_mask(tf.gather(names, order), covered),
            tf.boolean_mask(tf.gather(skips, order) + first - starts,
                            covered),
            tf.boolean_mask(last - first, covered))

  def read_window(epoch: tf.Tensor, number: tf.Tensor, begin: tf.Tensor,
                  end: tf.Tensor, lo: tf.Tensor,
                  hi: tf.Tensor) -> tf.data.Dataset:
    """One element: the window's records in reading order, [end - begin]
    each, after its (epoch, number, begin, lo, hi)."""
    records = tf.data.Dataset.from_tensor_slices(
        stretches(epoch, begin, end)).interleave(
            as_written(read_shard), cycle_length=PARALLEL_READS,
            num_parallel_calls=PARALLEL_READS, deterministic=True)
    return records.batch(window).map(
        as_written(lambda rows: (epoch, number, begin, lo, hi, rows)))

  def permuted(epoch: tf.Tensor, number: tf.Tensor, begin: tf.Tensor,
               lo: tf.Tensor, hi: tf.Tensor, rows: Example) -> tf.data.Dataset:
    """Rows [lo, hi) of the window's permutation, one by one, keyed: taken
    from ``rows`` ``GATHERED`` at a time as they are consumed (no permuted
    copy of the window)."""
    epoch_seed = tf.random.stateless_uniform(
        [], _epoch_seed(shuffle_seed, epoch), minval=None, maxval=None,
        dtype=tf.int64)
    size = tf.shape(rows["label"], out_type=tf.int64)[0]  # end - begin
    permutation = tf.random.experimental.stateless_shuffle(
        tf.range(size), seed=tf.stack([epoch_seed, number]))[lo:hi]
    first_key = (epoch * process_count + process_index) * epoch_len + begin
    return tf.data.Dataset.from_tensor_slices(
        (permutation, first_key + tf.range(lo, hi))).batch(GATHERED).map(
            as_written(lambda index, key: {
                **{k: tf.gather(v, index) for k, v in rows.items()},
                "key": key})).unbatch()

  windows = tf.data.Dataset.range(start_epoch, _NO_END).flat_map(
      as_written(epoch_windows))
  # The next window is read while the current one is consumed.
  return (windows.flat_map(as_written(read_window)).prefetch(1)
          .flat_map(as_written(permuted)))


def gather_rows(rows: tf.data.Dataset, images: np.ndarray,
                labels: np.ndarray) -> tf.data.Dataset:
  """{'index', ...} -> {'image': images[index], 'label': labels[index], ...}.

  ``images`` [N, ...] and ``labels`` [N] stay in memory as constants.
  """
  images, labels = tf.constant(images), tf.constant(labels, tf.int32)

  def gather(row: Example) -> Example:
    rest = {k: v for k, v in row.items() if k != "index"}
    return {"image": tf.gather(images, row["index"]),
            "label": tf.gather(labels, row["index"]), **rest}

  return rows.map(as_written(gather),
                  num_parallel_calls=tf.data.AUTOTUNE)


def padded_length(num_examples: int, local_batch: int,
                  process_count: int) -> int:
  """Examples per process of a padded pass: ceil(N / global batch) batches."""
  return math.ceil(num_examples / (local_batch * process_count)) * local_batch


def batch_slice_rows(num_examples: int, *, local_batch: int,
                     process_index: int, process_count: int) -> np.ndarray:
  """Rows this process evaluates when each takes a slice of every batch.

  Global batch b holds rows [b G, (b + 1) G), G = local_batch x
  process_count, and this process takes its contiguous ``local_batch`` of
  them: int64 [M], increasing, only rows < ``num_examples``.
  """
  position = np.arange(padded_length(num_examples, local_batch,
                                     process_count))
  rows = ((position // local_batch) * local_batch * process_count
          + process_index * local_batch + position % local_batch)
  return rows[rows < num_examples]


def padded_pass(examples: tf.data.Dataset, length: int,
                preprocess: Callable[[tf.Tensor], tf.Tensor]
                ) -> tf.data.Dataset:
  """{'image', 'label'} -> {'image': preprocess(image), 'label', 'mask'}.

  ``mask`` is True on the examples, then False on zero images of label 0
  appended up to ``length`` (which must be at least the number of examples).
  An encoded image that cannot be decoded is a zero image with ``mask``
  False too (``unreadable``). ``preprocess`` must return images of a fully
  defined shape.
  """

  def prepared(ex: Example) -> Example:
    if ex["image"].dtype == tf.string:
      image, readable = unreadable.decode_or_flag(preprocess, ex["image"])
    else:
      image, readable = preprocess(ex["image"]), tf.constant(True)
    return {"image": image, "label": ex["label"], "mask": readable}

  ds = examples.map(as_written(prepared),
                    num_parallel_calls=tf.data.AUTOTUNE)
  image = ds.element_spec["image"]
  padding = tf.data.Dataset.from_tensors({
      "image": tf.zeros(image.shape, image.dtype),
      "label": tf.constant(0, tf.int32), "mask": tf.constant(False)})
  return ds.concatenate(padding.repeat()).take(length)
