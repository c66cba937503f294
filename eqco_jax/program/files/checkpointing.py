"""Checkpoints of a run (orbax): save, keep the last few, resume, refuse
strangers, read another run's without touching it.

Each checkpoint holds the whole ``TrainState`` (online and momentum encoders,
optimizer, queue, PRNG key, step), a small JSON record of the config
fields that change what is trained (``run_identity``) and the digest of
every array of the state (``digests``). The data position needs no saving:
the input pipeline is a pure function of (seed, step). Orbax writes into a
temporary directory and renames it when complete, so a half-written
checkpoint is never seen by ``latest_step``.

A save that fails (a full disk, most often) stops the run with one sentence
(:func:`save`, :func:`wait_until_saved`); the checkpoints before it are
intact and the same command resumes from the newest. The tracebacks orbax
and asyncio log on the way are dropped (:func:`create_manager`).

A save is refused, on every process, once another run took the workdir's
lease over (``lease.check_held``): the run stops with the lease's one
sentence and writes no checkpoint after that.

A complete checkpoint damaged afterwards (a truncated, deleted or garbled
file, a missing item, a flipped bit that makes an array read back different
from its digest) is found when the run resumes: it is moved aside to
``workdir/damaged_checkpoints/<step>`` (kept for inspection, never deleted)
with one warning naming the step and the first cause, and the run resumes
from the newest one that restores. If none does, nothing is moved and the
run stops with one sentence. Checkpoints written before digests existed
restore as they read. Another run's checkpoints (the export, the linear
evaluation) are read the same way, newest intact first, and never moved
(:func:`load_state_arrays`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from eqco_jax.core import run_identity
from eqco_jax.core.errors import UserError, exception_chain, one_line
from eqco_jax.program import logs
from eqco_jax.program.files import digests
from eqco_jax.program.files import lease
from eqco_jax.program.files import storage
from eqco_jax.program.files.workdir import Workdir


def identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config fields recorded with each checkpoint (``run_identity``)."""
  return run_identity.identity(config)


class Manager(ocp.CheckpointManager):
  """orbax's manager, except that it never asks JAX's preemption sync point
  itself: the training loop asks once per step (:meth:`preempted_at`), and
  the manager answers orbax's own questions from that.

  orbax asks ``reached_preemption(step)`` in every save and again in the
  background thread that finalizes an asynchronous save, for that older
  step. JAX's protocol takes each process's latest step asked as where it
  is, so an older step asked late moves a process back: the agreed step
  (the furthest process's + 1) can then be one that another process already
  passed, and it trains on alone while the others save and exit, a hang.
  Seen in the TPU-pod SIGTERM test: one process stopped at step 4, the
  other's loop had asked 4 before the agreement and went on.
  """

  _preempted_step: int | None = None
  workdir: Workdir | None = None  # whose damaged checkpoints it moves aside

  def preempted_at(self, step: int) -> bool:
    """Whether every process saves ``step`` and stops (JAX's preemption sync
    point; False where the run is one process). Ask once per step, with
    increasing steps, from the training loop only."""
    try:
      reached = multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # no preemption service (a single process)
      reached = False
    if reached:
      self._preempted_step = step
    return reached

  def reached_preemption(self, step: int) -> bool:
    return self._preempted_step == step


def create_manager(workdir: Workdir, config: ml_collections.ConfigDict
                   ) -> Manager:
  """A manager of ``workdir``'s checkpoints: async, keeps the last few.
  From here on, the errors orbax logs before raising them are not printed
  (``logs.drop_library_errors``)."""
  logs.drop_library_errors()
  _drop_closed_loop_reports()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints,
      enable_async_checkpointing=True,
      cleanup_tmp_directories=True)
  manager = Manager(workdir.checkpoints, options=options,
                    item_handlers=_item_handlers())
  manager.workdir = workdir
  return manager


def _drop_closed_loop_reports() -> None:
  """After a save failed (a full disk), tensorstore's writes still in
  flight call back into orbax's event loop, closed by then, and Python
  prints a traceback for each (``RuntimeError: Event loop is closed``,
  through ``sys.unraisablehook``) after the run's one sentence. From here
  on those are dropped; any other report goes to the hook as before."""
  report = sys.unraisablehook
  if getattr(report, "drops_closed_loops", False):
    return

  def drop_closed_loops(unraisable: Any) -> None:
    if not (isinstance(unraisable.exc_value, RuntimeError) and
            str(unraisable.exc_value) == "Event loop is closed"):
      report(unraisable)

  drop_closed_loops.drops_closed_loops = True
  sys.unraisablehook = drop_closed_loops


def open_read_only(workdir: Workdir) -> ocp.CheckpointManager:
  """A manager that reads another run's checkpoints and never writes, deletes
  or cleans anything there (that run may still be writing)."""
  with logs.without_read_only_notice():
    return ocp.CheckpointManager(
        workdir.checkpoints,
        options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                             save_interval_steps=0),
        item_handlers=_item_handlers())


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
  return {"state": ocp.StandardCheckpointHandler(),
          "identity": ocp.JsonCheckpointHandler(),
          digests.ITEM: digests.Handler()}


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         config: ml_collections.ConfigDict) -> None:
  """Starts an asynchronous save of ``state`` as checkpoint ``step``, with
  the identity of ``config``; the caller decides when one is due.

  Raises:
    UserError: this save or the one before it failed (one sentence).
    lease.LeaseTaken: another run took the workdir's lease over; nothing is
      saved (on every process of the run).
  """
  lease.check_held(step)
  with _save_failures(manager):
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        identity=ocp.args.JsonSave(identity(config)),
        digests=digests.Save(state)), force=True)


def wait_until_saved(manager: ocp.CheckpointManager) -> None:
  """Waits for the save in flight, if any.

  Raises:
    UserError: it failed (one sentence).
  """
  with _save_failures(manager):
    manager.wait_until_finished()


def _is_disk_full(error: BaseException) -> bool:
  return any((isinstance(e, OSError) and e.errno == errno.ENOSPC)
             or "No space left on device" in str(e)  # tensorstore's
             for e in exception_chain(error))


@contextlib.contextmanager
def _save_failures(manager: ocp.CheckpointManager) -> Iterator[None]:
  """Turns a failed save into one sentence: which directory, the newest
  intact checkpoint and, for a full disk, the space a checkpoint needs."""
  try:
    yield
  except UserError:
    raise
  except Exception as error:  # pylint: disable=broad-except
    directory = os.fspath(manager.directory)
    manager.reload()
    intact = manager.latest_step()
    resume = (f"it resumes from step {intact}, which is intact"
              if intact is not None else "it starts from step 0")
    if not _is_disk_full(error):
      raise UserError(
          f"saving a checkpoint in {directory} failed ({first_cause(error)});"
          f" fix the cause and run the same command again: {resume}."
          ) from None
    if intact is not None and not storage.is_url(directory):
      needed = storage.local_size(storage.path(directory) / str(intact)) / 1e6
      free = storage.local_free_space(directory) / 1e6
      space = (f" (a checkpoint takes about {needed:.3g} MB, and "
               f"{free:.3g} MB are free there)")
    else:
      space = ""
    raise UserError(
        f"no space left on the device of {directory} while saving a "
        f"checkpoint{space}; free space there, or copy the workdir to a "
        f"larger disk and point --workdir at it, then run the same command: "
        f"{resume}.") from None


def check_identity(manager: ocp.CheckpointManager, step: int,
                   config: ml_collections.ConfigDict) -> None:
  """Raises UserError if checkpoint ``step`` was written by another config.

  The message names the first differing field, its recorded value and the
  new one. Fields the checkpoint does not record (written before they were
  part of the identity) are not compared, and a warning names them.
  """
  saved = manager.restore(step, args=ocp.args.Composite(
      identity=ocp.args.JsonRestore()))["identity"]
  wanted = identity(config)
  different = run_identity.first_difference(saved, wanted)
  if different:
    field, theirs, ours = different
    raise UserError(
        f"the checkpoint in {manager.directory} was written with "
        f"{field}={theirs!r} but this config has {field}={ours!r}; use a new "
        "--workdir or the config that wrote it.")
  unchecked = run_identity.unrecorded(saved, wanted)
  if unchecked:
    logging.warning(
        "The checkpoint of step %d in %s does not record %s (written before "
        "they were checked); resuming with this config's values.", step,
        manager.directory, ", ".join(unchecked))


def check_workdir(workdir: Workdir, config: ml_collections.ConfigDict
                  ) -> int | None:
  """The step of ``workdir``'s newest checkpoint whose identity reads (None
  if none does); raises UserError unless a config of the same identity
  wrote it. Reads only; cheap enough to run before anything is built or
  compiled (damaged checkpoints are left to :func:`restore_latest`)."""
  with open_read_only(workdir) as manager:
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        check_identity(manager, step, config)
        return step
      except UserError:
        raise
      except Exception:  # pylint: disable=broad-except
        continue  # damaged: restore_latest moves it aside
  return None


def first_cause(error: BaseException) -> str:
  """The first line of the innermost exception of ``error``'s chain that
  says something (libraries wrap the cause in generic messages)."""
  messages = [one_line(link) for link in exception_chain(error)]
  telling = [m for m in messages if len(m.split(": ", 1)[-1]) >= 12]
  return (telling or messages)[-1]


def _agreed(succeeded: bool) -> bool:
  """True where every process succeeded (a damaged file may be read by
  one process only)."""
  if jax.process_count() == 1:
    return succeeded
  flags = multihost_utils.process_allgather(np.asarray(succeeded))
  return bool(np.all(flags))


def restore_latest(manager: ocp.CheckpointManager, state: Any,
                   config: ml_collections.ConfigDict) -> Any:
  """The newest checkpoint that restores, into ``state``'s structure and
  shardings, or ``state`` itself when there is none; damaged newer ones are
  moved aside (see the module's doc).

  Raises:
    UserError: a checkpoint of another config, or none of the checkpoints
      restores.
  """
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)

  def read(step: int) -> Any:
    check_identity(manager, step, config)
    return digests.restore_state(manager, step, target)
  restored_step, restored, damaged = _newest_intact(
      sorted(manager.all_steps(), reverse=True), read)
  if damaged and restored_step is None:
    raise UserError(
        f"none of the checkpoints in {manager.directory} can be restored "
        f"({_listed(damaged)}); nothing was moved or deleted: restore them "
        "from a copy, or move the checkpoints folder aside to train from "
        "step 0.")
  for step, cause in damaged:
    kept = _move_aside(manager, step)
    logging.warning(
        "The checkpoint of step %d in %s is damaged (%s); it was moved to %s "
        "(kept for inspection) and the run resumes from step %d.", step,
        manager.directory, cause, kept, restored_step)
  if damaged:
    manager.reload()
  return state if restored is None else restored


def _newest_intact(steps: list[int], read: Callable[[int], Any]
                   ) -> tuple[int | None, Any, list[tuple[int, str]]]:
  """``(step, read(step), [(damaged step, first cause)...])`` of the first
  of ``steps`` that ``read`` reads on every process (``(None, None,
  ...)`` if none does).

  Raises:
    UserError: as ``read`` does.
  """
  damaged = []
  for step in steps:
    try:
      value, cause = read(step), None
    except UserError:
      raise
    except Exception as error:  # pylint: disable=broad-except
      value, cause = None, first_cause(error)
    if _agreed(cause is None):
      return step, value, damaged
    damaged.append((step, cause or "damaged on another process"))
  return None, None, damaged


def _listed(damaged: list[tuple[int, str]]) -> str:
  return "; ".join(f"step {s}: {c}" for s, c in damaged)


def _move_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves checkpoint ``step`` to the workdir's ``damaged_checkpoints/<step>``
  (``.2``, ``.3``... if taken; process 0, the others wait)."""
  folder = manager.workdir.damaged_checkpoints
  target = folder / str(step)
  if jax.process_index() == 0:
    folder.mkdir(parents=True, exist_ok=True)
    copy = 1
    while target.exists():
      copy += 1
      target = folder / f"{step}.{copy}"
    (storage.path(manager.directory) / str(step)).rename(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"moved aside checkpoint {step}")
  return os.fspath(target)


def load_state_arrays(workdir: Workdir, step: int | None = None) -> Any:
  """A checkpoint's train state as a plain pytree of arrays on one device,
  checked against its digests.

  For inspection and export, whatever the device count that wrote it. The
  tree is the state's fields as nested dicts. ``step=None`` means the
  newest intact one: newer damaged ones are named in one warning and left
  where they are (the run's files are only read).

  Raises:
    UserError: no such checkpoint, or none that reads (one sentence).
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with open_read_only(workdir) as manager:
    steps = sorted(manager.all_steps(), reverse=True)

    def read(step: int) -> Any:
      return digests.restore_state(manager, step, jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
          manager.item_metadata(step)["state"]))
    if not steps:
      raise UserError(f"{workdir}/checkpoints holds no checkpoint yet; "
                      "pretrain first or point at another run.")
    if step is not None and step not in steps:
      raise UserError(f"{workdir} has no checkpoint of step {step}; its "
                      f"checkpoints are of steps {steps[::-1]}.")
    found, arrays, damaged = _newest_intact(
        steps if step is None else [step], read)
  directory = manager.directory
  if found is None and step is not None:
    raise UserError(
        f"the checkpoint of step {step} in {directory} is damaged "
        f"({damaged[0][1]}); read another of its steps ({steps[::-1]}) or "
        "restore it from a copy.")
  if found is None:
    raise UserError(
        f"none of the checkpoints in {directory} can be read "
        f"({_listed(damaged)}); restore them from a copy or point at "
        "another run.")
  if damaged:
    logging.warning(
        "Damaged checkpoints in %s (%s) were left as they are; reading step "
        "%d, the newest intact one.", directory, _listed(damaged), found)
  return arrays
