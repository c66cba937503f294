"""eqco_jax.data.streams: the order, keys and padding of examples, as
functions of seeds and steps; each process's part of a split; TFRecord
windows read ahead."""

import bisect
import collections
import time

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

# Windows of at most 155: they straddle shards and batches.
SHARDS, PER_SHARD, WINDOW, BATCH = 20, 100, 155, 10


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


def _file_reads(ids) -> collections.Counter:
  """The records a reader of ``ids``' stretches of shards takes from the
  files: each shard from its first record (skipped ones too) to its last
  one of ``ids``."""
  last = collections.defaultdict(lambda: -1)
  for shard, index in (i.rsplit("__", 1) for i in ids):
    last[shard] = max(last[shard], int(index))
  return collections.Counter(f"{shard}__{i}" for shard, end in last.items()
                             for i in range(end + 1))


def test_a_resume_reads_one_window_and_one_shard_it_does_not_use(
    sharded_imagenet, monkeypatch):
  logs = []  # per stream: the records read from the files, in time order

  def logged(filename):
    log, name = logs[-1], tf.strings.regex_replace(filename, r"^.*/", "")

    def note(index, shard):
      log.append(f"{shard.numpy().decode()}__{index.numpy()}")
      return index

    return tf.data.TFRecordDataset(filename).enumerate().map(
        lambda i, record: (tf.py_function(note, [i, name], tf.int64), record)
        [1])

  monkeypatch.setattr(sources.tfds, "read_shard_records", logged)
  source = sources.get_source(helpers.data_config(
      dataset="imagenet2012", data_dir=sharded_imagenet,
      shuffle_buffer=WINDOW))

  def stream(step):
    logs.append([])
    return source.train_stream(
        Split("train"), global_batch_size=BATCH, start_step=step,
        shuffle_seed=3, process_index=0, process_count=1)

  steps = SHARDS * PER_SHARD // BATCH  # an epoch
  epoch_len = steps * BATCH
  whole = [ex["id"].numpy().decode()
           for ex in stream(0).take(2 * epoch_len + 2 * WINDOW)]

  bounds = streams.window_bounds(SHARDS * PER_SHARD, WINDOW)  # 13 windows
  assert bounds[:3] == [0, 153, 307] and bounds[-1] == epoch_len

  def window_at(position):  # [begin, end) of the window that holds it
    epoch_start = position - position % epoch_len
    w = bisect.bisect_right(bounds, position % epoch_len) - 1
    return epoch_start + bounds[w], epoch_start + bounds[w + 1]

  unused = {}
  # 15 holds a window's edge (153); 199 is the epoch's last step.
  for step in (0, 15, 100, 199, 200, 399):
    examples = iter(stream(step))
    ids = [next(examples)["id"].numpy().decode() for _ in range(BATCH)]
    reads = list(logs[-1])  # until the first batch
    ids += [next(examples)["id"].numpy().decode() for _ in range(BATCH)]
    assert ids == whole[step * BATCH:(step + 2) * BATCH]  # exactly so
    begin, end = window_at(step * BATCH)
    window_reads = _file_reads(whole[begin:end])
    # The step's window is read first, whole; then at most up to the window
    # after the one of the batch's last example (step 15's batch reaches
    # into the next window, which lets the one after be read ahead).
    read = sum(window_reads.values())
    assert collections.Counter(reads[:read]) == window_reads, step
    last = window_at((step + 1) * BATCH - 1)[0]
    nexts = [window_at(end)] + ([window_at(window_at(end)[1])]
                                if last >= end else [])
    assert not (collections.Counter(reads[read:])
                - sum((_file_reads(whole[b:e]) for b, e in nexts),
                      collections.Counter())), step
    unused[step] = read - (end - step * BATCH)
  # The window's records before the step, and its first shard's before it.
  assert max(unused.values()) < WINDOW + PER_SHARD, unused
  assert unused[0] == unused[200] == 0, unused  # an epoch's first step
  epochs = [whole[:epoch_len], whole[epoch_len:2 * epoch_len]]
  assert sorted(epochs[0]) == sorted(epochs[1])  # every example once
  shard_of = lambda ids: [i.split("__")[0] for i in ids]
  # Each epoch reads the shards in another order.
  first_shards = [list(dict.fromkeys(shard_of(e))) for e in epochs]
  assert sorted(first_shards[0]) == sorted(first_shards[1])
  assert first_shards[0] != first_shards[1]


# ------------------------------------------- the windows' reading, timed.

# Shards of a fake split: (name, skip, take), 174 records, the first
# starting mid-file; 21 batches of 8 (168) an epoch; windows of at most 50:
# 4 of 43 or 44, their edges at 43, 87 and 130.
FAKE_SHARDS = [(f"s{i}", 3 if i == 0 else 0, 9 + i) for i in range(12)]


def _fake_stream(read_shard, start_step):
  return streams.sharded_epochs(
      FAKE_SHARDS, read_shard, split="train", local_batch=8,
      start_step=start_step, shuffle_seed=3, window=50, process_index=0,
      process_count=1)


def _fake_reader(on_read=None):
  """read_shard of FAKE_SHARDS' records, ids 'sI__INDEX'; ``on_read(id)``
  is called (from the reading threads) as each record is read."""

  def read_shard(name, skip, take):
    def example(index):
      record = tf.strings.join([name, tf.strings.as_string(index)], "__")
      if on_read is not None:
        record = tf.py_function(lambda r: on_read(r.numpy().decode()) or r,
                                [record], tf.string)
      return {"image": record, "label": tf.constant(0, tf.int32),
              "id": record}
    return tf.data.Dataset.range(skip, skip + take).map(example)

  return read_shard


def test_batches_do_not_depend_on_the_reading_threads_timing():
  rng = np.random.default_rng()  # unseeded: another timing every run
  jittery = _fake_reader(lambda _: time.sleep(rng.uniform(0, 1e-3)))
  take = lambda stream, n: [ex["id"].numpy().decode()
                            for ex in stream.take(n)]
  whole = take(_fake_stream(_fake_reader(), 0), 2 * 168 + 16)
  assert take(_fake_stream(jittery, 0), len(whole)) == whole
  assert sorted(whole[:168]) == sorted(set(whole[:168]))
  assert whole[:168] != whole[168:336]  # another order each epoch
  # Two batches across a window's edge (at 43), and across the epoch's.
  for step in (5, 20):
    assert take(_fake_stream(jittery, step), 16) == whole[
        step * 8:step * 8 + 16], step


def test_the_next_window_is_read_while_this_one_is_consumed():
  reads = []
  options = tf.data.Options()  # no prefetch of examples (tf.data's own)
  options.experimental_optimization.inject_prefetch = False
  examples = iter(_fake_stream(_fake_reader(reads.append), 0).with_options(
      options))

  def wait_for(count):  # until ``count`` records are read, at most 10 s
    deadline = time.monotonic() + 10
    while len(reads) < count and time.monotonic() < deadline:
      time.sleep(0.01)
    return len(reads)

  next(examples)  # window 0's first example: all of window 0 (43) is read
  # Window 1 (44) is read while 42 examples of window 0 are still to come
  assert wait_for(87) == 87
  time.sleep(0.2)
  assert len(reads) == 87  # ... and nothing more: two windows held.
  for _ in range(42):
    next(examples)
  assert len(reads) == 87
  next(examples)  # window 1's first: window 2 (43) is read
  assert wait_for(130) == 130
