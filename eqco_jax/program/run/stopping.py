"""When a loop must stop: a step that diverged, or a SIGTERM or a SIGINT
(Ctrl-C); and either signal in work with nothing to save at a step, such
as the final evaluation (:class:`Interrupts`).

The pretraining loop calls :meth:`Stopping.after_step` once after every
step; the linear evaluation's asks :meth:`StopRequests.at`.

* Divergence: the metrics of the steps since the last check are checked at
  every log step and before every save, and the whole train state before
  every save. A non-finite value stops the run with :class:`Diverged`, one
  sentence naming the step and the metric, before anything non-finite is
  saved: the newest checkpoint on disk is the newest finite one and no later
  save rotates it out. A divergence found by the first check after a resume
  says so; where that checkpoint has no digests (written before they
  existed) it is named as suspect, with the path to move it to.
* Preemption, Ctrl-C: a SIGTERM or a SIGINT to any process asks every
  process to save the same step and stop cleanly; the same command
  resumes. In a multi-process run (``jax.distributed`` initialised) JAX's
  preemption service does it: its own SIGTERM handler (C++, installed by
  ``jax.distributed.initialize``) tells the coordination service, and
  ``reached_preemption_sync_point``, asked every step by the loop and by
  nothing else (``checkpointing.Manager``), answers True on every process
  at the same step, with no collective of ours. A Python handler would
  replace JAX's (the operating system keeps one handler per signal), so
  none is installed then; a SIGINT is handed on to it as a SIGTERM. A
  single process remembers either signal with a Python handler.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from typing import Any, Iterable, Iterator, Sequence, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from eqco_jax.core.errors import UserError
from eqco_jax.core.types import Metrics
from eqco_jax.program.files import checkpointing
from eqco_jax.program.files import digests

WATCHED = ("loss", "grad_norm")
T = TypeVar("T")


class Diverged(UserError):
  """The loss, the gradient norm or the train state stopped being finite."""


def first_non_finite(metrics: Sequence[Metrics],
                     first_step: int) -> tuple[int, str, float] | None:
  """``(step, metric, value)`` of the earliest non-finite watched metric.

  ``metrics[i]`` holds the metrics of step ``first_step + i``. One
  device-to-host copy per watched metric.
  """
  names = [n for n in WATCHED if metrics and n in metrics[0]]
  if not names:
    return None
  values = jax.device_get({n: jnp.stack([m[n] for m in metrics])
                           for n in names})
  for offset in range(len(metrics)):
    for name in names:
      value = float(np.asarray(values[name][offset]))
      if not math.isfinite(value):
        return first_step + offset, name, value
  return None


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def state_is_finite(state: Any) -> bool:
  """Whether every floating-point array of ``state`` is finite."""
  return bool(_all_finite(state))


def divergence_message(step: int, what: str, newest_checkpoint: int | None,
                       directory: str, resumed_intact: int | None = None
                       ) -> str:
  """The one sentence a diverged run stops with (``resumed_intact``: the
  step of the checkpoint it had just resumed from, which its digests showed
  to read back exactly as saved)."""
  kept = (f"the newest checkpoint, step {newest_checkpoint} in {directory}, "
          "is finite" if newest_checkpoint is not None
          else "no checkpoint was saved")
  after = (f", right after resuming from the checkpoint of step "
           f"{resumed_intact}, which read back exactly as it was saved"
           if resumed_intact else "")
  return (f"training diverged at step {step}: {what}{after}; nothing "
          f"non-finite was saved and {kept}; lower base_learning_rate (or "
          "raise warmup_steps) and start again in a new --workdir.")


def unchecked_resume_message(step: int, what: str, resumed: int,
                             checkpoint: str, aside: str,
                             previous: int | None) -> str:
  """The one sentence a run stops with when it diverged at its first check
  after resuming from the checkpoint of step ``resumed`` (the folder
  ``checkpoint``), written before checkpoints had digests: that checkpoint
  may be damaged, and moving it to ``aside`` lets the same command resume
  from step ``previous``."""
  then = (f"resumes from step {previous}" if previous is not None
          else "starts from step 0")
  return (f"training diverged at step {step}: {what}, right after resuming "
          f"from the checkpoint of step {resumed}, which has no digests to "
          f"check it by and may be damaged; nothing non-finite was saved: "
          f"move {checkpoint} to {aside} and run the same command, which "
          f"{then}.")


class _StopSignals:
  """A context manager: inside, a single process remembers a SIGTERM or a
  SIGINT (Ctrl-C) in ``received`` (the first one's name) instead of ending;
  the previous handlers come back on exit.

  A multi-process run leaves SIGTERM to JAX's preemption service and hands
  a SIGINT on to it as a SIGTERM to this process (the service watches
  SIGTERM only; a terminal's Ctrl-C reaches every process of its foreground
  group, and one notice from any process is enough); ``received`` stays
  None there, as one process alone must not stop. After a SIGINT, a second
  one ends the process at once (the system's default action), whatever it
  waits for: a checkpoint being written then stays in orbax's temporary
  folder, never half-written in place. A SIGINT ignored on entry (a
  background job of a non-interactive shell, ``nohup``) stays ignored.

  Args:
    what_now: what a single process does about a signal, for the log line.
    what_now_together: the same in a multi-process run.
  """

  def __init__(self, what_now: str, what_now_together: str):
    self.received: str | None = None
    self.what_now = what_now
    self.what_now_together = what_now_together
    self._noted: str | None = None  # this process's signal, if any
    self._previous: dict[int, Any] = {}

  @property
  def reason(self) -> str:
    """The signal this process stops after: its own, else SIGTERM (JAX's
    preemption notices come from a SIGTERM to some process)."""
    return self._noted or "SIGTERM"

  def check(self) -> None:
    """Raises :class:`Interrupted` if a signal came (single process)."""
    if self.received:
      raise Interrupted(self.received)

  def __enter__(self):
    handlers = {signal.SIGINT: self._on_sigint}
    if not jax.distributed.is_initialized():  # else JAX's service has it
      handlers[signal.SIGTERM] = self._on_signal
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
      del handlers[signal.SIGINT]
    try:
      for signum, handler in handlers.items():
        self._previous[signum] = signal.signal(signum, handler)
    except ValueError:  # Not the main thread: leave signals alone.
      pass
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _on_signal(self, signum: int, frame: Any, note: str = "") -> None:
    del frame
    name = signal.Signals(signum).name
    together = jax.distributed.is_initialized()
    logging.warning("Received %s: %s%s.", name, self.what_now_together
                    if together else self.what_now, note)
    self._noted = self._noted or name
    if not together:
      self.received = self.received or name

  def _on_sigint(self, signum: int, frame: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # the next one ends it
    self._on_signal(signum, frame, note=" (Ctrl-C again ends it at once, "
                    "without saving)")
    if jax.distributed.is_initialized():
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notice


class StopRequests(_StopSignals):
  """Asked once per step by a loop that saves and stops: whether every
  process saves this step and stops (a SIGTERM or a SIGINT to any process,
  or another preemption notice). A context manager, as
  :class:`_StopSignals`.

  Args:
    manager: the run's checkpoint manager (JAX's preemption sync point).
  """

  def __init__(self, manager: checkpointing.Manager):
    super().__init__("saving a checkpoint, then exiting",
                     "every process saves the same step, then exits")
    self.manager = manager

  def at(self, step: int) -> bool:
    """True on every process, at the same step, when any process was asked
    to stop (JAX's sync point is asked every step, as it must be)."""
    if self.manager.preempted_at(step):
      logging.warning("Preemption notice: every process saves step %d, then "
                      "exits.", step)
      return True
    return self.received is not None


class Stopping(StopRequests):
  """Decides, after each step, whether the loop may go on.

  A context manager, as :class:`_StopSignals`.

  Args:
    manager: the run's checkpoint manager (JAX's preemption sync point, and
      the newest checkpoint for the divergence message).
    log_every_steps: the metrics are checked at these steps.
    state: a train state like the loop's: the check of its values is
      compiled now (beside the step), not at the first save, or at the
      stop a preemption notice asks for, which has seconds.
    resumed_from: the step of the checkpoint the run resumed from (0: it
      started from scratch); a divergence at the first check after it
      says so, and names that checkpoint as suspect if it has no digests
      (then nothing showed that it read back as saved).
  """

  def __init__(self, manager: checkpointing.Manager, *, log_every_steps: int,
               state: Any = None, resumed_from: int = 0):
    super().__init__(manager)
    self.log_every_steps = log_every_steps
    self._all_finite = (_all_finite if state is None else
                        _all_finite.lower(state).compile())
    self.resumed_from = resumed_from
    self._checked = False  # whether a check ran since the start

  def after_step(self, step: int, pending: Sequence[Metrics], state: Any, *,
                 saving: bool, last: bool) -> bool:
    """Called once after every step; True when the run must save ``state``
    and stop (a SIGTERM or a preemption notice on any process).

    Args:
      step: the steps done.
      pending: the metrics of the steps since the last log step, the last
        one of ``step``.
      state: the train state after ``step``.
      saving: a checkpoint of ``state`` is due.
      last: ``step`` is the run's last (it finishes instead of stopping).

    Raises:
      Diverged: once in-flight saves are done, if a metric of ``pending`` is
        not finite (checked at log steps and before a save) or the state is
        not (checked before a save).
    """
    stop = not last and self.at(step)
    if saving or stop:
      self._check_finite(pending, step, state)
    elif step % self.log_every_steps == 0:
      self._check_finite(pending, step)
    return stop

  def _check_finite(self, pending: Sequence[Metrics], step: int,
                    state: Any = None) -> None:
    first_check, self._checked = not self._checked, True
    found = first_non_finite(pending, step - len(pending) + 1)
    if found is not None:
      bad_step, name, value = found
      what = f"{name} was {value}"
    elif state is not None and not bool(self._all_finite(state)):
      bad_step, what = step, "the train state holds non-finite values"
    else:
      return
    checkpointing.wait_until_saved(self.manager)
    directory, resumed = str(self.manager.directory), self.resumed_from
    right_after_resume = first_check and resumed > 0
    if right_after_resume and not digests.written_with(self.manager,
                                                       resumed):
      workdir = self.manager.workdir
      earlier = [s for s in self.manager.all_steps() if s < resumed]
      raise Diverged(unchecked_resume_message(
          bad_step, what, resumed, str(workdir.checkpoints / str(resumed)),
          str(workdir.damaged_checkpoints / str(resumed)),
          max(earlier, default=None)))
    raise Diverged(divergence_message(
        bad_step, what, self.manager.latest_step(), directory,
        resumed if right_after_resume else None))


class Interrupted(Exception):
  """A SIGTERM or a SIGINT (its name) arrived inside :class:`Interrupts`."""


class Interrupts(_StopSignals):
  """Inside, a single process remembers a SIGTERM or a SIGINT, and
  :meth:`check` raises :class:`Interrupted` once one came.

  For work that has nothing to save at a step, such as the final
  evaluation: it calls :meth:`check` between its batches. (Raising from the
  signal handler itself would be lost wherever a library catches every
  exception, as ``logging`` does while it writes a line.) A multi-process
  run leaves SIGTERM to JAX's preemption service, whose notice nothing asks
  here: every process goes on to the end together (stopping one alone would
  leave the others waiting in a collective).

  Args:
    what: the work, for the log line ("the final evaluation").
  """

  def __init__(self, what: str = "the final evaluation"):
    super().__init__(f"stopping {what}",
                     f"{what} goes on to its end on every process")


def checked(items: Iterable[T], interrupts: _StopSignals) -> Iterator[T]:
  """``items``, calling ``interrupts.check()`` before each."""
  for item in items:
    interrupts.check()
    yield item


# ------------------------------------------ a stopped process ends quickly.
# A stopped run's input pipelines: tf.data's iterator, when deleted, waits for
# the elements its threads are making (seconds on a busy host), which a
# preemption notice does not leave. Kept here until :func:`exit_if_stopped`.
_PARKED: list[Any] = []


def park(*pipelines: Any) -> None:
  """Keeps ``pipelines`` (iterators of a run that stopped after saving) from
  being torn down: :func:`exit_if_stopped` then ends the process."""
  _PARKED.extend(pipelines)


def forget_parked() -> None:
  """Lets go of pipelines parked by an earlier run of this process."""
  _PARKED.clear()


def exit_if_stopped() -> None:
  """Ends the process at once, status 0, if its run stopped after saving
  (:func:`park`): every process of the run first meets the others in JAX's
  shutdown barrier, so none leaves while another still needs it; the logs
  and standard streams are flushed; the parked pipelines are never torn
  down. Otherwise returns."""
  if not _PARKED:
    return
  if jax.process_count() > 1:
    jax.distributed.shutdown()
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)  # pylint: disable=protected-access
