"""How far the host runs ahead of the devices, and how long the devices wait
for the input.

JAX dispatches a step and returns at once; left alone, the host runs tens of
steps ahead of the devices (the CPU client about 32), and anything that must
wait for the devices (a checkpoint, a log line, the stop after a preemption
notice) first waits for that whole queue. :class:`Pacer` keeps at most
``STEPS_IN_FLIGHT`` steps dispatched and unfinished: after dispatching step
s the loop waits until step s - STEPS_IN_FLIGHT has finished. Two steps keep
an accelerator busy (while one runs the next is queued, and the host
prepares the one after); one would leave the device idle during every
dispatch.

It also measures the time the devices sat idle for want of a batch: a
thread watches each step finish (``block_until_ready`` on its outputs) and
notes when; the device was starved between the end of step s and the start
of step s + 1 where the host was still fetching batch s + 1 then. A
device-bound loop waits on the devices, never in the input, and scores about
0; an input-bound one scores the share of time its devices had nothing to
do. (The host's own time in ``next(batches)`` overlaps the queued steps and
says neither.)
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from typing import Any, Iterator, TypeVar

import jax

T = TypeVar("T")

# Steps dispatched and not yet finished, at most.
STEPS_IN_FLIGHT = 2


class Pacer:
  """Paces a training loop (see the module's doc).

  Use: ``batches = pacer.fetching(batches)``; after dispatching step ``s``
  (1-based), ``pacer.dispatched(s, outputs)``, which returns once step
  ``s - STEPS_IN_FLIGHT`` has finished. ``starved_seconds`` grows by the
  time the devices waited for a batch.
  """

  def __init__(self, steps_in_flight: int = STEPS_IN_FLIGHT):
    self.steps_in_flight = steps_in_flight
    self.starved_seconds = 0.0
    self._finished_step = 0
    self._finished_at: float | None = None  # when the newest step finished
    self._fetches: collections.deque[tuple[float, float]] = (
        collections.deque())
    self._watch: queue.Queue = queue.Queue()
    self._changed = threading.Condition()
    self._thread = threading.Thread(target=self._watch_steps, daemon=True,
                                    name="step-watcher")
    self._thread.start()

  def fetching(self, batches: Iterator[T]) -> Iterator[T]:
    """``batches``, noting when the loop waited for each."""
    for batch in _timed(batches, self._fetches):
      yield batch

  def dispatched(self, step: int, outputs: Any) -> None:
    """Step ``step``'s outputs were dispatched; returns once no more than
    ``steps_in_flight`` steps are unfinished."""
    fetch = self._fetches.popleft() if self._fetches else None
    self._watch.put((step, outputs, fetch))
    self.wait_until(step - self.steps_in_flight)

  def wait_until(self, step: int) -> None:
    """Returns once step ``step`` has finished on the devices."""
    with self._changed:
      while self._finished_step < step:
        self._changed.wait()

  def close(self) -> None:
    """Waits for every dispatched step; the watcher ends."""
    self._watch.put(None)
    self._thread.join()

  def _watch_steps(self) -> None:
    while (item := self._watch.get()) is not None:
      step, outputs, fetch = item
      # The device's gap before this step, if the host was still fetching
      # its batch then: from the previous step's end (or the fetch's start,
      # if later) to the fetch's end.
      with self._changed:
        previous_end = self._finished_at
      if fetch is not None and previous_end is not None:
        began, ended = fetch
        self.starved_seconds += max(0.0, ended - max(began, previous_end))
      jax.block_until_ready(outputs)
      with self._changed:
        self._finished_step, self._finished_at = step, time.perf_counter()
        self._changed.notify_all()


def _timed(batches: Iterator[T],
           fetches: collections.deque[tuple[float, float]]) -> Iterator[T]:
  """``batches``, appending ``(start, end)`` of each wait to ``fetches``."""
  while True:
    start = time.perf_counter()
    try:
      batch = next(batches)
    except StopIteration:
      return
    fetches.append((start, time.perf_counter()))
    yield batch
