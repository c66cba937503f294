"""What a workdir holds: every file a pretraining run, its linear evaluation
and its export read or write there, in one list.

=================================== =========================================
``checkpoints/``                    orbax, a folder per step
                                    (:mod:`eqco_jax.program.checkpointing`)
``config.json``                     the run's config, written once the
                                    workdir's checkpoint (if any) accepted it
``progress.json``                   what the summary needs from training,
                                    kept as it goes: the first and latest
                                    log interval's metrics, the images/s
                                    measured, the final evaluation's
                                    finished parts (:class:`Progress`)
``skipped_records.process_I.json``  process I's unreadable records, by step
``damaged_checkpoints/<step>``      a checkpoint that did not restore, moved
                                    aside whole (:mod:`.checkpointing`)
``file_lists/<split>.json``         an image folder's files, listed at the
                                    run's first start and read by every
                                    resume (:meth:`Workdir.keep_file_list`)
``summary.json``                    the pretraining run's result
``linear_eval.json``                a linear evaluation's result
``lease.json``                      who writes the workdir now, renewed
                                    while the run lives
                                    (:mod:`eqco_jax.program.lease`)
``events.out.tfevents.*``           TensorBoard events
                                    (:mod:`eqco_jax.program.tensorboard_writer`)
``plugins/profile/<run>/``          a trace of ``profile_steps`` steps
                                    (:mod:`eqco_jax.program.performance`)
=================================== =========================================

A damaged JSON record (truncated, or not JSON) is rebuilt where the rest of
the workdir can make it again (``summary.json``, see :data:`REBUILT`; and
``config.json``, which a pretraining run writes at every start), with a
warning; any other stops the run with one sentence before anything
compiles, naming the file and what to do.

Light: imports neither jax nor TensorFlow, so ``main`` can check a workdir
in a second, before the heavy imports. Files go through
:mod:`eqco_jax.program.storage`, so a workdir may be local or ``gs://``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
from typing import Any, Callable

import ml_collections
from absl import logging
from etils import epath

from eqco_jax.core import config as config_lib
from eqco_jax.core.errors import UserError, one_line
from eqco_jax.program import storage

CHECKPOINTS = "checkpoints"
DAMAGED_CHECKPOINTS = "damaged_checkpoints"
CONFIG = "config.json"
PROGRESS = "progress.json"
SKIPPED_RECORDS = "skipped_records.process_{index}.json"
SUMMARY = "summary.json"
LINEAR_EVAL = "linear_eval.json"
LEASE = "lease.json"
FILE_LISTS = "file_lists"
# Written by runs made before progress.json; read when it is absent.
FIRST_INTERVAL_METRICS = "first_interval_metrics.json"

# The records a damaged copy of which the run makes again, and how.
# (config.json, which a pretraining run writes at every start, is never
# read by one; see Workdir.read_run_config.)
REBUILT = {
    SUMMARY: "when the run ends (the final evaluation's finished parts are "
             "kept in progress.json)",
}
# What is lost with each other record when it is moved aside.
_LOST_WITHOUT = {
    PROGRESS: "the summary's initial_grad_norm, and its final_loss and "
              "images_per_sec if training had finished",
    SKIPPED_RECORDS: "the count of the unreadable records it listed",
}


class SkippedRecords:
  """Unreadable records a process's pretraining stream left out, by the
  (1-based) step whose batch they were in; each is logged once, when first
  met. Re-running a step records the same ids for the same step, so the
  count over steps 1..N is the same however often the run was interrupted.
  """

  def __init__(self, by_step: dict[int, list[str]] | None = None):
    self.by_step: dict[int, list[str]] = dict(by_step or {})

  def add(self, step: int, records: list[str]) -> None:
    if self.by_step.get(step) != records:
      logging.warning(
          "Skipped %d unreadable record(s) in the batch of step %d: %s; "
          "their places went to other images of that batch.", len(records),
          step, ", ".join(records))
    self.by_step[step] = records

  def count(self, through_step: int) -> int:
    """Records left out by steps 1..``through_step``."""
    return sum(len(r) for s, r in self.by_step.items() if s <= through_step)


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


@dataclasses.dataclass(frozen=True)
class Workdir:
  """The files of one workdir, local or on object storage.

  Attributes:
    location: the ``--workdir`` as given (a path or a ``gs://`` URL).
  """
  location: str

  @property
  def root(self) -> epath.Path:
    return storage.path(self.location)

  @property
  def checkpoints(self) -> epath.Path:
    return self.root / CHECKPOINTS

  def read_json(self, name: str) -> Any | None:
    """The JSON record ``name`` (one of this module's names), or None.

    Raises:
      UserError: the record is damaged and cannot be rebuilt (a damaged
        one that can is None, with a warning).
    """
    try:
      return storage.read_json(self.root / name)
    except storage.DamagedFile as damage:
      if name in REBUILT:
        logging.warning("%s; it will be written again %s.", damage,
                        REBUILT[name])
        return None
      raise self._beyond_repair(name, str(damage)) from None

  def _beyond_repair(self, name: str, damage: str) -> UserError:
    """The one sentence for a damaged record the workdir cannot rebuild."""
    kind = SKIPPED_RECORDS if name.startswith("skipped_records.") else name
    return UserError(
        f"{damage}, and the rest of the workdir cannot rebuild it: restore it "
        "from a copy, or move it aside and run the same command again "
        f"(losing {_LOST_WITHOUT.get(kind, 'what it held')}).")

  def write_json(self, name: str, record: Any) -> None:
    """Writes the JSON record ``name`` whole (never half of it)."""
    storage.write_json_atomic(self.root / name, record)

  def read_run_config(self, *, flag: str = "config.pretrain_workdir"
                      ) -> ml_collections.ConfigDict:
    """The config this pretraining run recorded, under today's names;
    ``flag`` is what the user set, for the messages."""
    try:
      recorded = storage.read_json(self.root / CONFIG)
    except storage.DamagedFile as damage:
      raise UserError(
          f"{damage}; run that workdir's pretraining command again (it "
          "writes config.json at every start, and a finished run only "
          "rewrites what is missing), then this one.") from None
    if recorded is None:
      raise UserError(f"{self.root / CONFIG} does not exist; point {flag} "
                      "at the --workdir of a pretraining run.")
    return ml_collections.ConfigDict(config_lib.upgrade_names(recorded))

  def write_run_config(self, config: ml_collections.ConfigDict) -> None:
    """Writes ``config.json``: the config as JSON (tuples become lists)."""
    self.write_json(CONFIG, json.loads(config.to_json_best_effort()))

  def keep_file_list(self, split: str, make: Callable[[], list[str]], *,
                     write: bool) -> list[str]:
    """The image folder's list of files of ``split``, kept in
    ``file_lists/<split>.json``: made by ``make()`` at the run's first
    start (and written there if ``write``: by process 0), read back by
    every resume, so that a run and its resumes see one list whatever is
    added to the folder. A damaged list is made again, with a warning."""
    kept = self.root / FILE_LISTS / f"{split.replace('/', '__')}.json"
    try:
      files = storage.read_json(kept)
    except storage.DamagedFile as damage:
      logging.warning("%s; listing the folder again.", damage)
      files = None
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
      return files
    start = time.monotonic()
    files = make()
    logging.info("Listed %d images of split %r in %.1f s; the list is kept "
                 "in %s.", len(files), split, time.monotonic() - start, kept)
    if write:
      kept.parent.mkdir(parents=True, exist_ok=True)
      storage.write_bytes_atomic(kept, json.dumps(files).encode())
    return files

  def read_progress(self) -> Progress:
    """The run's progress so far (a new run's: nothing; a run made before
    ``progress.json``: its first interval's metrics)."""
    recorded = self.read_json(PROGRESS)
    if recorded is None:
      return Progress(first_interval=self.read_json(FIRST_INTERVAL_METRICS))
    try:
      return Progress(**recorded)
    except TypeError as error:  # valid JSON, but not a Progress
      raise self._beyond_repair(
          PROGRESS, f"{self.root / PROGRESS} is damaged ({error})") from None

  def write_progress(self, progress: Progress) -> None:
    self.write_json(PROGRESS, dataclasses.asdict(progress))

  def skipped_records(self, process_index: int) -> SkippedRecords:
    """Process ``process_index``'s skipped records so far (none for a new
    run)."""
    name = SKIPPED_RECORDS.format(index=process_index)
    recorded = self.read_json(name) or {}
    try:
      return SkippedRecords({int(step): list(records)
                             for step, records in recorded.items()})
    except (AttributeError, TypeError, ValueError) as error:  # not by step
      raise self._beyond_repair(
          name, f"{self.root / name} is damaged ({error})") from None

  def save_skipped_records(self, skipped: SkippedRecords,
                           process_index: int) -> None:
    """Writes process ``process_index``'s record, if it skipped anything."""
    if skipped.by_step:
      self.write_json(SKIPPED_RECORDS.format(index=process_index),
                      {str(s): r for s, r in sorted(skipped.by_step.items())})


def read_run_config(location: str | None, *,
                    flag: str = "config.pretrain_workdir"
                    ) -> ml_collections.ConfigDict:
  """The config of the pretraining run in ``location``, which ``flag``
  names (for the messages, e.g. when it is not set)."""
  if not location:
    raise UserError(f"{flag} is not set; pass --{flag.lstrip('-')}=DIR of a "
                    "pretraining run.")
  return Workdir(location).read_run_config(flag=flag)


# How long a workdir on object storage may take to answer at start.
REACH_TIMEOUT_SECS = 15.0


def _write_check(directory: epath.Path) -> None:
  directory.mkdir(parents=True, exist_ok=True)
  probe = directory / f".write_check.{socket.gethostname()}.{os.getpid()}"
  probe.write_text("ok")
  probe.unlink()


def _within_timeout(fn, *args) -> None:
  """``fn(*args)`` in a daemon thread, whose failure it raises; TimeoutError
  if it takes longer than ``REACH_TIMEOUT_SECS`` (the thread is left to
  itself and does not keep the process alive)."""
  outcome = []

  def call():
    try:
      fn(*args)
      outcome.append(None)
    except BaseException as error:  # pylint: disable=broad-except
      outcome.append(error)

  thread = threading.Thread(target=call, daemon=True)
  thread.start()
  thread.join(REACH_TIMEOUT_SECS)
  if not outcome:
    raise TimeoutError(f"no answer within {REACH_TIMEOUT_SECS:.0f} s")
  if outcome[0] is not None:
    raise outcome[0]


def prepare(location: str | os.PathLike) -> Workdir:
  """Creates the workdir (and checks that it can be written) before any
  work.

  Raises UserError, one sentence naming the location and the problem
  (missing bucket, credentials, network, permissions), instead of a
  traceback later in the run. A location on object storage that does not
  answer within ``REACH_TIMEOUT_SECS`` (gcsfs would retry for a minute) is
  such a problem too.
  """
  directory = storage.path(location)
  try:
    if storage.is_url(location):
      _within_timeout(_write_check, directory)
    else:
      _write_check(directory)
  except Exception as error:  # any backend's failure, said in one sentence
    raise UserError(
        f"cannot write to the workdir {os.fspath(location)} "
        f"({one_line(error)}); check that the location "
        "exists and that this machine's credentials (for gs://: gcloud auth "
        "application-default login, or the VM's service account) and network "
        "reach it, or choose another --workdir.") from None
  return Workdir(os.fspath(location))
