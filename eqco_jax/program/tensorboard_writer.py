"""TensorBoard event files written through the storage layer (``storage``).

TensorFlow's summary writer reaches object storage only through its own
filesystem; this writer goes through epath like every other file of a run,
so a ``gs://`` workdir gets its events the same way as its checkpoints. On
object storage a file cannot grow, so events are kept in memory and written
as whole files (``events.out.tfevents.<start>.<host>.<pid>.<segment>``) on
``flush`` and at most every ``flush_every_secs``; TensorBoard reads the
segments of a directory in name order as one stream.
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

from eqco_jax.program import storage


def _record(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC, the data, the data's masked CRC."""
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc32c(header)) + data +
          struct.pack("<I", masked_crc32c(data)))


class EventFileWriter(metric_writers.MetricWriter):
  """Scalars and hyperparameters as TensorBoard events under ``logdir``."""

  def __init__(self, logdir: str, *, flush_every_secs: float = 120.0):
    self._directory = storage.path(logdir)
    self._prefix = (f"events.out.tfevents.{int(time.time())}."
                    f"{socket.gethostname()}.{os.getpid()}")
    self._flush_every_secs = flush_every_secs
    self._pending: list[bytes] = []
    self._segment = 0
    self._last_flush = time.monotonic()

  def _add(self, step: int, summary: summary_pb2.Summary) -> None:
    event = event_pb2.Event(wall_time=time.time(), step=int(step),
                            summary=summary)
    self._pending.append(_record(event.SerializeToString()))
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
    """Writes the pending events as the next whole segment file."""
    self._last_flush = time.monotonic()
    if not self._pending:
      return
    version = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
    data = b"".join([_record(version.SerializeToString()), *self._pending])
    name = f"{self._prefix}.{self._segment:05d}"
    storage.write_bytes_atomic(self._directory / name, data)
    self._pending, self._segment = [], self._segment + 1

  def close(self) -> None:
    self.flush()


def create_writer(workdir: str, *, just_logging: bool
                  ) -> metric_writers.MetricWriter:
  """Log lines on every process; event files in ``workdir`` unless
  ``just_logging`` (processes other than 0). Writes happen off the loop."""
  writers = [metric_writers.LoggingWriter()]
  if not just_logging:
    writers.append(EventFileWriter(workdir))
  return metric_writers.AsyncMultiWriter(writers)
