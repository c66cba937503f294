"""How long training waits for the TFRecord reader at its windows' edges.

Writes ``--shards`` TFRecord files of ``--records_per_shard`` tiny records
once (in ``--cache_dir``), then reads them as the TFDS sources read a
prepared dataset's shards (``eqco_jax.data.streams.sharded_epochs``, one
process, windows of the config's ``shuffle_buffer``, batches of its
``batch_size``), through a source slowed to a known rate: the files give
records at ``--rate_ratio`` times the rate the consumer takes them, in all,
however many are read at once (a bandwidth, as a bucket's), and a record
skipped in a file costs as much as one read. The consumer takes a batch,
then computes for ``--compute_ms`` (a sleep: the step), for ``--windows``
windows' worth of batches after the first.

Reports the time it waited for its batches as a share of its compute time:
at the batches that hold a window's first record (the window edges, an
epoch's first included), and at the others; the first batch's wait (the
first window read whole) apart, with the rate the source really gave. The
last line printed is one JSON object.

  python -m benchmarks.reader_stalls [--config=configs/simo.py:imagenet_r50]
      [--config.FIELD=VALUE ...] [--compute_ms=50 --rate_ratio=1.5]
      [--windows=4]  # repo root
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import pathlib
import tempfile
import threading
import time

import numpy as np
import tensorflow as tf
from absl import flags
from absl import logging
from ml_collections import config_flags

from eqco_jax.data import streams
from eqco_jax.data.tfdata import as_written, deterministic
from eqco_jax.program.commands import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Records that pass the slowed source together (a buffered read).
CHUNK = 16


class Throttle:
  """Lets records through at ``rate`` a second in all, whichever threads
  ask: each call waits until its ``count`` records have had their turn.

  Turns are kept on a schedule, not counted from each call: a reader that
  asks again soon after its turn (within ``SLACK`` s: its own work between
  chunks) loses no time to that work, or to sleep's overshoot.
  """

  SLACK = 0.02

  def __init__(self, rate: float):
    self.interval = 1.0 / rate
    self.lock = threading.Lock()
    self.free_at = 0.0  # when the source has given every record asked for
    self.first_call = None
    self.records = 0

  def __call__(self, count: np.ndarray) -> np.int64:
    with self.lock:
      now = time.perf_counter()
      if self.first_call is None:  # no slack before the first record
        self.first_call = self.free_at = now
      self.records += int(count)
      self.free_at = (max(now - self.SLACK, self.free_at)
                      + int(count) * self.interval)
      done = self.free_at
    time.sleep(max(0.0, done - now))
    return np.int64(count)


def write_shards(directory: pathlib.Path, shards: int,
                 per_shard: int) -> list[streams.Shard]:
  """``shards`` TFRecord files of ``per_shard`` 64-byte records, made once;
  the whole of each, as ``sharded_epochs`` takes them."""
  directory.mkdir(parents=True, exist_ok=True)
  files = []
  for s in range(shards):
    path = directory / f"shard-{s:05d}-of-{shards:05d}-{per_shard}.tfrecord"
    if not path.exists():
      tmp = path.with_suffix(".tmp")
      with tf.io.TFRecordWriter(str(tmp)) as writer:
        for i in range(per_shard):
          writer.write(f"{s:05d}:{i:07d}".encode().ljust(64, b"."))
      tmp.rename(path)
    files.append((str(path), 0, per_shard))
  return files


def slowed_reader(throttle: Throttle) -> streams.ReadShard:
  """read_shard of the shards' records, each CHUNK of a file passing
  ``throttle`` first (the ones skipped too)."""

  def read_shard(filename: tf.Tensor, skip: tf.Tensor,
                 take: tf.Tensor) -> tf.data.Dataset:
    def slowed(chunk: tf.Tensor) -> tf.Tensor:
      passed = tf.numpy_function(throttle, [tf.size(chunk, tf.int64)],
                                 tf.int64)
      with tf.control_dependencies([passed]):
        return tf.identity(chunk)

    records = tf.data.TFRecordDataset(filename).batch(CHUNK).map(
        as_written(slowed)).unbatch().skip(skip).take(take)
    return records.map(as_written(lambda record: {
        "image": record, "label": tf.constant(0, tf.int32), "id": filename}))

  return read_shard


def define_flags(flag_values: flags.FlagValues) -> None:
  """The benchmark's flags, on ``flag_values``."""
  define = dict(flag_values=flag_values)
  flags.DEFINE_float("compute_ms", 50.0, "The consumer's time per batch.",
                     **define)
  flags.DEFINE_float("rate_ratio", 1.5, "The source's records per second "
                     "over those the consumer takes.", **define)
  flags.DEFINE_integer("windows", 4, "Windows of batches timed, after the "
                       "first batch.", **define)
  flags.DEFINE_integer("shards", 32, "TFRecord files.", **define)
  flags.DEFINE_integer("records_per_shard", 1251, "Records in each file "
                       "(1,251: ImageNet's in TFDS's 1,024 shards).", **define)
  flags.DEFINE_string("cache_dir", os.path.join(
      tempfile.gettempdir(), "eqco_jax_bench_shards_v1"), "Where the files "
      "are kept between runs.", **define)
  config_flags.DEFINE_config_file(
      "config", os.path.join(ROOT, "configs", "simo.py:imagenet_r50"),
      "The recipe whose batch size and window (shuffle_buffer) are read: "
      "FILE.py[:VARIANT].", lock_config=True, **define)


def is_edge(step: int, batch: int, steps: int, bounds: np.ndarray) -> bool:
  """Whether batch ``step`` holds the first record of a window (positions
  ``bounds[:-1]`` of each epoch of ``steps`` batches)."""
  first = step % steps * batch
  return bool(np.any((bounds[:-1] >= first) & (bounds[:-1] < first + batch)))


def measure(args: flags.FlagValues) -> dict:
  """Reads and consumes; returns the figures."""
  batch, window = args.config.batch_size, args.config.shuffle_buffer
  compute = args.compute_ms / 1e3
  rate = args.rate_ratio * batch / compute
  shards = write_shards(pathlib.Path(args.cache_dir), args.shards,
                        args.records_per_shard)
  throttle = Throttle(rate)
  stream = streams.sharded_epochs(
      shards, slowed_reader(throttle), split="train", local_batch=batch,
      start_step=0, shuffle_seed=0, window=window, process_index=0,
      process_count=1)
  # As pipeline.pretrain_dataset ends.
  batches = iter(deterministic(stream.batch(batch, drop_remainder=True)
                               .prefetch(tf.data.AUTOTUNE)))
  num = args.shards * args.records_per_shard
  if hasattr(streams, "window_bounds"):
    bounds = np.array(streams.window_bounds(num, window))
  else:  # the reader before issue 30 (an older checkout): fixed windows
    bounds = np.array([*range(0, num, window), num])
  steps = num // batch
  start = time.perf_counter()
  next(batches)
  first_wait = time.perf_counter() - start
  # What the source gave until then: its rate as the pipeline could take it.
  given = throttle.records / (time.perf_counter() - throttle.first_call)
  waits = {True: [], False: []}
  timed = args.windows * window // batch
  for step in range(1, 1 + timed):
    time.sleep(compute)
    start = time.perf_counter()
    next(batches)
    waits[is_edge(step, batch, steps, bounds)].append(
        time.perf_counter() - start)
  compute_s = timed * compute
  edges = waits[True]
  logging.info("waits at %d window edges (ms): %s", len(edges),
               " ".join(f"{1e3 * w:.0f}" for w in edges))
  return {
      "edge_wait_share": round(sum(edges) / compute_s, 4),
      "other_wait_share": round(sum(waits[False]) / compute_s, 4),
      "edge_wait_ms_max": round(1e3 * max(edges, default=0.0), 1),
      "window_edges": len(edges),
      "first_batch_s": round(first_wait, 3),
      "compute_s": round(compute_s, 2),
      "consumer_records_per_sec": round(batch / compute, 1),
      "source_records_per_sec": round(rate, 1),
      "source_gave_records_per_sec": round(given, 1),
      "batch_size": batch,
      "window": window,
      "windows_per_epoch": len(bounds) - 1,
      "parallel_reads": getattr(streams, "PARALLEL_READS", 1),
  }


def main(args: flags.FlagValues) -> None:
  print(json.dumps(measure(args)))


if __name__ == "__main__":
  cli.run(main, define_flags)
