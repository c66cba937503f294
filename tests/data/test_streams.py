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
from eqco_jax.data.sources import Split


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
      Split("train"), global_batch_size=batch_size, start_step=0, shuffle_seed=5,
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
        Split("train"), global_batch_size=10, start_step=0, shuffle_seed=3,
        process_index=index, process_count=2)
    first_epoch = [tf.io.decode_png(ex["image"]).numpy()
                   for ex in stream.take(25)]
    seen.append(helpers.example_ids(first_epoch))
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(FAKE_CIFAR_SIZES["train"]))
  assert seen[0] != sorted(seen[0])  # Shuffled.


# ------------------------------------ a resume of a many-shard ImageNet.

SHARDS, PER_SHARD, WINDOW, BATCH = 20, 100, 100, 10


@pytest.fixture(scope="module")
def sharded_imagenet(tmp_path_factory) -> str:
  """A prepared 'imagenet2012' of 2,000 tiny JPEGs in 20 shards of 100."""
  import tensorflow_datasets as tfds

  data_dir = str(tmp_path_factory.mktemp("sharded_imagenet"))
  info = tfds.builder("imagenet2012", data_dir=data_dir).info
  rng = np.random.default_rng(0)
  n = SHARDS * PER_SHARD
  splits = {name: tf.data.Dataset.from_tensor_slices({
      "image": rng.integers(0, 256, (size, 8, 8, 3), dtype=np.uint8),
      "label": np.arange(size) % 1000,
      "file_name": [f"{name}_{i}.JPEG" for i in range(size)]})
            for name, size in (("train", n), ("validation", 20))}
  tfds.dataset_builders.TfDataBuilder(
      name="imagenet2012", version=str(info.version), split_datasets=splits,
      features=info.features, data_dir=data_dir).download_and_prepare(
          download_config=tfds.download.DownloadConfig(num_shards=SHARDS))
  return data_dir


def test_a_resume_reads_at_most_a_shard_and_a_window_it_does_not_use(
    sharded_imagenet, monkeypatch):
  read = tf.Variable(0, dtype=tf.int64)

  def counted(filename):
    def count(record):
      with tf.control_dependencies([read.assign_add(1)]):
        return tf.identity(record)
    return tf.data.TFRecordDataset(filename).map(count)

  monkeypatch.setattr(sources.tfds, "read_shard_records", counted)
  source = sources.get_source(helpers.data_config(
      dataset="imagenet2012", data_dir=sharded_imagenet,
      shuffle_buffer=WINDOW))
  stream = lambda step: source.train_stream(
      Split("train"), global_batch_size=BATCH, start_step=step, shuffle_seed=3,
      process_index=0, process_count=1)
  steps = SHARDS * PER_SHARD // BATCH  # an epoch
  whole = [ex["id"].numpy() for ex in stream(0).take(2 * steps * BATCH)]
  read.assign(0)
  assert read.numpy() == 0
  counts = {}
  for step in (0, steps // 2, steps - 1, steps, 3 * steps // 2, 2 * steps - 1):
    read.assign(0)
    first = [ex["id"].numpy() for ex in stream(step).take(BATCH)]
    counts[step] = int(read.numpy())
    assert first == whole[step * BATCH:(step + 1) * BATCH]  # exactly so
  assert max(counts.values()) <= PER_SHARD + WINDOW, counts
  epochs = [whole[:steps * BATCH], whole[steps * BATCH:]]
  assert sorted(epochs[0]) == sorted(epochs[1])  # every example once
  shard_of = lambda ids: [i.decode().split("__")[0] for i in ids]
  # Each epoch reads the shards in another order.
  first_shards = [list(dict.fromkeys(shard_of(e))) for e in epochs]
  assert sorted(first_shards[0]) == sorted(first_shards[1])
  assert first_shards[0] != first_shards[1]
