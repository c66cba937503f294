"""TensorBoard event files written through the storage layer (``storage``).

TensorFlow's summary writer reaches object storage only through its own
filesystem; this writer goes through epath like every other file of a run,
so a ``gs://`` workdir gets its events the same way as its checkpoints. An
object cannot grow, so each process start writes one file,
``events.out.tfevents.<start>.<host>.<pid>``, rewritten whole (never half
of it: ``storage.write_bytes_atomic``, whose temporary name no reader takes
for an event file) on ``flush`` and at most every ``flush_every_secs``.
Once a file holds ``max_bytes``, the next events go to a new file of the
same name with ``.1``, ``.2``... appended. A restarted run adds one file; a
month of training at a log line a second, a few dozen. TensorBoard reads
the files of a directory as one stream.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Any, Mapping

from clu import metric_writers
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.plugins.hparams import summary_v2 as hparams_summary

from eqco_jax.program.files import storage
from eqco_jax.program.files.workdir import Workdir


def _record(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC, the data, the data's masked CRC."""
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc32c(header)) + data +
          struct.pack("<I", masked_crc32c(data)))


class EventFileWriter(metric_writers.MetricWriter):
  """Scalars and hyperparameters as TensorBoard events under ``logdir``."""

  def __init__(self, logdir: str | os.PathLike, *,
               flush_every_secs: float = 120.0, max_bytes: int = 8 * 2**20):
    self._directory = storage.path(logdir)
    self._name = (f"events.out.tfevents.{int(time.time()):010d}."
                  f"{socket.gethostname()}.{os.getpid()}")
    self._flush_every_secs = flush_every_secs
    self._max_bytes = max_bytes
    self._part = 0
    self._records: list[bytes] = [self._version()]
    self._size = len(self._records[0])
    self._unwritten = False
    self._last_flush = time.monotonic()

  @staticmethod
  def _version() -> bytes:
    return _record(event_pb2.Event(
        wall_time=time.time(), file_version="brain.Event:2").SerializeToString())

  def _add(self, step: int, summary: summary_pb2.Summary) -> None:
    record = _record(event_pb2.Event(wall_time=time.time(), step=int(step),
                                     summary=summary).SerializeToString())
    if self._size + len(record) > self._max_bytes and len(self._records) > 1:
      self.flush()  # this file is full: the next one starts
      self._part += 1
      self._records = [self._version()]
      self._size = len(self._records[0])
    self._records.append(record)
    self._size += len(record)
    self._unwritten = True
    if time.monotonic() - self._last_flush > self._flush_every_secs:
      self.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._add(step, summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=name, simple_value=float(value))
        for name, value in scalars.items()]))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._add(0, hparams_summary.hparams_pb(dict(hparams)))

  def write_summaries(self, step, values, metadata=None) -> None:
    del step, values, metadata
    raise NotImplementedError("EventFileWriter records scalars and "
                              "hyperparameters only.")

  write_images = write_videos = write_audios = write_texts = write_summaries
  write_histograms = write_summaries

  def flush(self) -> None:
    """Writes the current file whole, with every event it holds so far."""
    self._last_flush = time.monotonic()
    if not self._unwritten:
      return
    name = self._name + (f".{self._part}" if self._part else "")
    storage.write_bytes_atomic(self._directory / name, b"".join(self._records))
    self._unwritten = False

  def close(self) -> None:
    self.flush()


def create_writer(workdir: Workdir, *, just_logging: bool
                  ) -> metric_writers.MetricWriter:
  """Log lines on every process; event files in ``workdir`` unless
  ``just_logging`` (processes other than 0). Writes happen off the loop."""
  writers = [metric_writers.LoggingWriter()]
  if not just_logging:
    writers.append(EventFileWriter(workdir.events))
  return metric_writers.AsyncMultiWriter(writers)
