"""eqco_jax.data.streams: the order, keys and padding of examples, as
functions of seeds and steps; each process's part of a split."""

import numpy as np
import pytest
import tensorflow as tf

import helpers
from conftest import FAKE_CIFAR_SIZES
from eqco_jax.core.errors import UserError
from eqco_jax.data import sources
from eqco_jax.data import streams


def test_batch_arithmetic_and_its_messages():
  assert streams.local_batch_size(256, 8) == 32
  with pytest.raises(UserError, match=r"Global batch size 30 is not "
                     r"divisible by the 4 processes; choose a multiple of 4"):
    streams.local_batch_size(30, 4)
  assert streams.steps_per_epoch(1000, 96, "test") == 10
  with pytest.raises(UserError, match=r"Split 'x' has 5 examples .* fewer "
                     r"than one batch of 8; use a smaller batch size"):
    streams.steps_per_epoch(5, 8, "x")
  # 23 examples, batches of 2 x 3 processes: 4 global batches of 6.
  assert streams.padded_length(23, 2, 3) == 8
  rows = [streams.batch_slice_rows(23, local_batch=2, process_index=i,
                                   process_count=3) for i in range(3)]
  assert list(rows[1]) == [2, 3, 8, 9, 14, 15, 20, 21]
  assert sorted(np.concatenate(rows)) == list(range(23))


def test_permuted_epochs_are_the_same_global_batches_for_any_process_count():
  images = np.arange(40, dtype=np.int64).reshape(40, 1)
  labels = np.arange(40, dtype=np.int32) % 4

  def batches(index, count, start_step=0):
    ds = streams.permuted_epochs(
        images, labels, split="train", global_batch_size=8,
        start_step=start_step, shuffle_seed=3, process_index=index,
        process_count=count).batch(8 // count)
    return [b["image"].numpy().ravel() for b in ds.take(7)]

  whole = batches(0, 1)
  halves = [batches(i, 2) for i in range(2)]
  for step in range(7):
    np.testing.assert_array_equal(
        np.concatenate([halves[0][step], halves[1][step]]), whole[step])
  assert sorted(np.concatenate(whole[:5])) == list(range(40))  # An epoch.
  assert not np.array_equal(whole[0], whole[5])  # The next is reshuffled.
  np.testing.assert_array_equal(batches(0, 1, start_step=6)[0], whole[6])


def _digit_stream(process_index, process_count, batch_size):
  return sources.get_source(helpers.data_config()).train_stream(
      "train", global_batch_size=batch_size, start_step=0, shuffle_seed=5,
      process_index=process_index, process_count=process_count)


def test_in_memory_shards_are_disjoint_and_cover_each_epoch():
  # 10 steps per epoch, 200 per process.
  parts = [next(iter(_digit_stream(i, 2, batch_size=400).batch(2000)))
           for i in range(2)]
  pixels = np.concatenate([p["image"].numpy().reshape(2000, -1)
                           for p in parts])
  assert len({row.tobytes() for row in pixels}) == 4000  # Every digit once.
  keys = [set(p["key"].numpy()) for p in parts]
  assert not keys[0] & keys[1] and keys[0] | keys[1] == set(range(4000))
  labels = np.concatenate([p["label"].numpy() for p in parts])
  np.testing.assert_array_equal(np.bincount(labels), [400] * 10)


def test_tfds_process_shards_are_disjoint_and_cover_the_split(fake_tfds_dir):
  source = sources.get_source(helpers.data_config(
      dataset="cifar10", data_dir=fake_tfds_dir, shuffle_buffer=100))
  seen = []
  for index in range(2):
    stream = source.train_stream(
        "train", global_batch_size=10, start_step=0, shuffle_seed=3,
        process_index=index, process_count=2)
    first_epoch = [tf.io.decode_png(ex["image"]).numpy()
                   for ex in stream.take(25)]
    seen.append(helpers.example_ids(first_epoch))
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(FAKE_CIFAR_SIZES["train"]))
  assert seen[0] != sorted(seen[0])  # Shuffled.
