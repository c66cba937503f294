"""What the run files of a pretraining run hold, besides its config: the
progress the summary needs (``progress.json``) and each process's unreadable
records (``skipped_records.process_I.json``), as the loop keeps them; and
their writes off the loop (:class:`BackgroundWrites`). The workdir
(``workdir.Workdir``) reads and writes them.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable

from absl import logging

from eqco_jax.core.errors import one_line


class SkippedRecords:
  """Unreadable records a process's pretraining stream left out, by the
  (1-based) step whose batch they were in (logged once a log interval:
  ``bookkeeping.log_skipped``). Re-running a step records the same ids for
  the same step, so the count over steps 1..N is the same however often the
  run was interrupted.
  """

  def __init__(self, by_step: dict[int, list[str]] | None = None):
    self.by_step: dict[int, list[str]] = dict(by_step or {})

  def add(self, step: int, records: list[str]) -> None:
    self.by_step[step] = records

  def count(self, through_step: int) -> int:
    """Records left out by steps 1..``through_step``."""
    return sum(len(r) for s, r in self.by_step.items() if s <= through_step)

  def to_json(self) -> dict[str, list[str]]:
    return {str(s): r for s, r in sorted(self.by_step.items())}

  @classmethod
  def from_json(cls, recorded: Any) -> SkippedRecords:
    """Raises TypeError or ValueError for JSON that is not records by step."""
    if not isinstance(recorded, dict):
      raise TypeError(f"a {type(recorded).__name__}, not records by step")
    return cls({int(step): [str(r) for r in records]
                for step, records in recorded.items()})


@dataclasses.dataclass
class Progress:
  """What the summary needs from training, kept in ``progress.json`` as
  training goes, so that a run killed at any moment after its last
  checkpoint ends, with the same command, in the summary an uninterrupted
  run writes.

  Attributes:
    step: the step of ``last_interval``.
    first_interval: the first log interval's metrics (the summary's
      ``initial_grad_norm``).
    last_interval: the latest log interval's metrics (at the run's last
      step: the summary's ``final_loss``).
    timed_steps: steps of the log intervals whose time was measured.
    timed_seconds: their wall time (the summary's ``images_per_sec``).
    final_evaluation: the final evaluation's finished parts (``pretrained``,
      ``baseline``), each its results.
  """
  step: int = 0
  first_interval: dict[str, float] | None = None
  last_interval: dict[str, float] | None = None
  timed_steps: int = 0
  timed_seconds: float = 0.0
  final_evaluation: dict[str, dict[str, float]] = dataclasses.field(
      default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, recorded: Any) -> Progress:
    """Raises TypeError for JSON that is not a Progress."""
    if not isinstance(recorded, dict):
      raise TypeError(f"a {type(recorded).__name__}, not an object")
    return cls(**recorded)


class BackgroundWrites:
  """Run files written by a thread of their own, off the training loop.

  :meth:`put` hands over the newest content of a file and returns at once;
  the thread writes it with ``write(name, content)``. A write that fails (a
  bucket's hiccup, a full disk) is logged and tried again, with the newest
  content by then, after ``RETRY_SECS`` (doubling up to a minute): it never
  raises into the loop. :meth:`flush` waits for what was handed over and
  says what still fails.
  """

  RETRY_SECS = 1.0

  def __init__(self, write: Callable[[str, Any], None]):
    self._write = write
    self._pending: dict[str, Any] = {}
    self._failures: dict[str, str] = {}
    self._changed = threading.Condition()
    self._closed = False
    self._flushes = 0  # calls of flush so far
    self._thread = threading.Thread(target=self._run, daemon=True,
                                    name="run-file-writes")
    self._thread.start()

  def put(self, name: str, content: Any) -> None:
    with self._changed:
      self._pending[name] = content
      self._changed.notify_all()

  def flush(self, timeout: float) -> dict[str, str]:
    """Waits up to ``timeout`` seconds for every file handed over to be
    written; returns ``{name: why}`` of those that are not. A failed write
    waiting out its delay is tried again at once (the disk may be fixed)."""
    deadline = time.monotonic() + timeout
    with self._changed:
      self._flushes += 1  # ends the writer's delay
      self._changed.notify_all()
      while self._pending and time.monotonic() < deadline:
        self._changed.wait(max(0.0, deadline - time.monotonic()))
      return {name: self._failures.get(name, "still being written")
              for name in self._pending}

  def close(self, timeout: float) -> dict[str, str]:
    """:meth:`flush`, then the thread ends."""
    unwritten = self.flush(timeout)
    with self._changed:
      self._closed = True
      self._changed.notify_all()
    return unwritten

  def _run(self) -> None:
    delay = self.RETRY_SECS
    while True:
      with self._changed:
        while not self._pending and not self._closed:
          self._changed.wait()
        if self._closed:
          return
        name, content = next(iter(self._pending.items()))
        flushes = self._flushes
      try:
        self._write(name, content)
      except Exception as error:  # pylint: disable=broad-except
        why = one_line(error)
        logging.warning("Could not write %s (%s); trying again in %.0f s.",
                        name, why, delay)
        with self._changed:
          self._failures[name] = why
          self._changed.wait_for(lambda: self._flushes != flushes, delay)
        delay = min(2 * delay, 60.0)
        continue
      delay = self.RETRY_SECS
      with self._changed:
        self._failures.pop(name, None)
        if self._pending.get(name) is content:  # nothing newer came
          del self._pending[name]
        self._changed.notify_all()
