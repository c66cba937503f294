"""TensorBoard event files written through the storage layer (``storage``).

TensorFlow's summary writer reaches object storage only through its own
filesystem; this writer goes through epath like every other file of a run,
so a ``gs://`` workdir gets its events the same way as its checkpoints.

How TensorBoard reads them decides how they are written (tensorboard 2.21):

* Its default loader, the data server (``tensorboard/data/server``: run.rs
  ``RunLoader``), opens each file once, keeps it open and reads on from
  where it stopped; on ``gs://`` it reads byte ranges from that offset
  (gcs/logdir.rs ``File::read``). So a local file only grows, by appending
  (never a rename, which the open file would not see), and an object, which
  cannot grow, is uploaded again whole with the same bytes first (as
  TensorFlow's own GCS writer does on each flush): at ``flush`` and at most
  every ``flush_every_secs``, not at every event.
* Both loaders read the files of a directory in the order of their names
  and take a file left for a later one as finished, so a new file has a
  later name: ``events.out.tfevents.<created>.<host>.<pid>``, ``created``
  in seconds, later than the name before it in this process. A new file
  starts once the current one would pass ``max_bytes`` (8 MiB) or is
  ``max_age_secs`` old (a day), and one per process start: a log line a
  second (about 210 bytes) fills 8 MiB in 11 hours, 3 files a day, 90 a
  month; a line every 5 s or less often, one file a day.
* A run killed after its last checkpoint logged points that the resumed run
  logs again. The data server keeps, for each tag, only the latest point of
  a step that comes again (reservoir.rs ``StageReservoir::offer``: a point
  of step s drops the earlier ones of steps >= s). The Python loader
  (``--load_fast=false``, ``EventAccumulator``) drops them on TensorBoard's
  restart marker instead, an event ``session_log.status = START`` at the
  first step the process writes (plugin_event_accumulator.py
  ``_CheckForRestartAndMaybePurge``: every point of step >= that step read
  before it, after the first START of the run). Each process writes one as
  its first event.

What TensorBoard shows therefore never loses a point once the loop has
flushed (``flush``, at each checkpoint save) and shows each step once after
any number of kills and resumes.

A write that fails (a full or read-only disk) is said by the loop's next
write or flush in one sentence (a UserError), in the loop's own thread;
the writer's thread, where the events are written, never raises (clu would
log its traceback).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from typing import Any, Callable, Iterator, Mapping

from clu import metric_writers
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.plugins.hparams import summary_v2 as hparams_summary

from eqco_jax.core.errors import UserError, one_line
from eqco_jax.program.files import storage
from eqco_jax.program.files.workdir import Workdir

DAY = 24 * 3600.0


def _record(event: event_pb2.Event) -> bytes:
  """One TFRecord: length, its masked CRC, the data, the data's masked CRC."""
  data = event.SerializeToString()
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc32c(header)) + data +
          struct.pack("<I", masked_crc32c(data)))


def _first_step(resumed_from: int) -> int:
  """The first step a process that starts at checkpoint ``resumed_from``
  writes (0, a fresh start: the hyperparameters; else the step after)."""
  return resumed_from + 1 if resumed_from else 0


class EventFileWriter(metric_writers.MetricWriter):
  """Scalars and hyperparameters as TensorBoard events under ``logdir``, for
  a process that starts after checkpoint ``resumed_from`` (0: a fresh
  start). ``clock`` (seconds) dates the events and the files."""

  def __init__(self, logdir: str | os.PathLike, *, resumed_from: int = 0,
               flush_every_secs: float = 120.0, max_bytes: int = 8 * 2**20,
               max_age_secs: float = DAY,
               clock: Callable[[], float] = time.time):
    self._directory = storage.path(logdir)
    self._local = not storage.is_url(self._directory)
    self._flush_every_secs = flush_every_secs
    self._max_bytes = max_bytes
    self._max_age_secs = max_age_secs
    self._clock = clock
    self._origin = f"{socket.gethostname()}.{os.getpid()}"
    self._created = 0  # the current file's name's time
    self._last_upload = clock()
    self._failure: UserError | None = None  # the first write that failed
    self._target = self._directory / "events.out.tfevents.*"
    with self._said():
      self._start_file()
      self._write(_record(event_pb2.Event(
          wall_time=clock(), step=_first_step(resumed_from),
          session_log=event_pb2.SessionLog(
              status=event_pb2.SessionLog.START))))
    self.check()

  @contextlib.contextmanager
  def _said(self) -> Iterator[None]:
    """Keeps the first failure inside as one sentence, for :meth:`check`;
    once one is kept, nothing more is written."""
    try:
      yield
    except Exception as error:  # any storage's failure
      if self._failure is None:
        self._failure = UserError(
            f"cannot write the TensorBoard events file {self._target} "
            f"({one_line(error)}); make the workdir writable (or free space "
            "on its disk) and run the same command again: it resumes from "
            "the newest checkpoint.")

  def check(self) -> None:
    """Raises the UserError of the first write that failed, if any."""
    if self._failure is not None:
      raise self._failure

  def _start_file(self) -> None:
    """Starts a file named later than the one before (ended by the
    caller), holding the file version."""
    now = self._clock()
    self._created = max(int(now), self._created + 1)
    self._target = (self._directory /
                    f"events.out.tfevents.{self._created:010d}.{self._origin}")
    self._started_at = now
    self._size, self._summaries = 0, 0
    self._records: list[bytes] = []  # the object's (object storage)
    self._unwritten = False
    if self._local:
      self._file = storage.open_to_append(self._target)
    self._write(_record(event_pb2.Event(wall_time=now,
                                        file_version="brain.Event:2")))

  def _write(self, record: bytes) -> None:
    if self._local:
      self._file.write(record)
    else:
      self._records.append(record)
      self._unwritten = True
    self._size += len(record)

  def _add(self, step: int, summary: summary_pb2.Summary) -> None:
    if self._failure is None:
      with self._said():
        self._add_record(step, summary)

  def _add_record(self, step: int, summary: summary_pb2.Summary) -> None:
    now = self._clock()
    record = _record(event_pb2.Event(wall_time=now, step=int(step),
                                     summary=summary))
    if self._summaries and (
        self._size + len(record) > self._max_bytes or
        now - self._started_at >= self._max_age_secs):
      self.close()
      self._start_file()
    self._write(record)
    self._summaries += 1
    if not self._local and now - self._last_upload > self._flush_every_secs:
      self._flush()

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
    """Makes every event so far durable: the local file synced to its disk
    (its readers saw each event at once), the object uploaded whole.

    Raises:
      UserError: an event could not be written (one sentence).
    """
    if self._failure is None:
      with self._said():
        self._flush()
    self.check()

  def _flush(self) -> None:
    if self._local:
      if not self._file.closed:
        os.fsync(self._file.fileno())
      return
    self._last_upload = self._clock()
    if self._unwritten:
      storage.write_bytes_atomic(self._target, b"".join(self._records))
      self._unwritten = False

  def close(self) -> None:
    """Flushes, and ends the current file."""
    self.flush()
    if self._local:
      self._file.close()


class _Checked(metric_writers.AsyncMultiWriter):
  """clu's writers, off the loop; a write of ``events`` that failed in
  their thread is raised by the loop's next write or flush."""

  def __init__(self, writers: list[metric_writers.MetricWriter],
               events: EventFileWriter | None):
    super().__init__(writers)
    self._events = events

  def _check(self) -> None:
    if self._events is not None:
      self._events.check()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._check()
    super().write_scalars(step, scalars)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._check()
    super().write_hparams(hparams)


def create_writer(workdir: Workdir, *, just_logging: bool, resumed_from: int
                  ) -> metric_writers.MetricWriter:
  """Log lines on every process; event files in ``workdir`` unless
  ``just_logging`` (processes other than 0), for a process that starts
  after step ``resumed_from``. Writes happen off the loop."""
  events = None if just_logging else EventFileWriter(
      workdir.events, resumed_from=resumed_from)
  return _Checked([metric_writers.LoggingWriter(),
                   *([events] if events else [])], events)
