"""The workdir: the one door to a run's files. Every part of the program
that reads or writes a run's files is handed a :class:`Workdir`, which owns
every path in it and reads the run's config in one place.

=================================== =========================================
``checkpoints/``                    orbax, a folder per step
                                    (:mod:`eqco_jax.program.files.checkpointing`)
``damaged_checkpoints/<step>``      a checkpoint that did not restore, moved
                                    aside whole
``config.json``                     the run's config, written once the
                                    workdir's checkpoint (if any) accepted it
``progress.json``                   what the summary needs from training,
                                    kept as it goes (``run_files.Progress``)
``skipped_records.process_I.json``  process I's unreadable records, by step
``file_lists/<split>.json``         an image folder's files, listed at the
                                    run's first start and read by every
                                    resume (:meth:`Workdir.keep_file_list`)
``summary.json``                    the pretraining run's result
``linear_eval.json``                a linear evaluation's result
``lease.json``                      who writes the workdir now, renewed
                                    while the run lives
                                    (:mod:`eqco_jax.program.files.lease`)
``events.out.tfevents.*``           TensorBoard events
                                    (:mod:`eqco_jax.program.files.events`)
``plugins/profile/<run>/``          a trace of ``profile_steps`` steps
=================================== =========================================

The JSON files are the run files. A damaged one (truncated, or not JSON) is
rebuilt where the rest of the workdir can make it again (``summary.json``,
see :data:`REBUILT`; and ``config.json``, which a pretraining run writes at
every start), with a warning; any other stops the run with one sentence
before anything compiles, naming the file and what to do.

Light: imports neither jax nor TensorFlow, so ``main`` can check a workdir
in a second, before the heavy imports. Files go through
:mod:`eqco_jax.program.files.storage`, so a workdir may be local or
``gs://``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import ml_collections
from absl import logging
from etils import epath

from eqco_jax.core.errors import UserError, one_line
from eqco_jax.program.files import storage
from eqco_jax.program.files.run_files import Progress, SkippedRecords

CONFIG = "config.json"
PROGRESS = "progress.json"
SKIPPED_RECORDS = "skipped_records.process_{index}.json"
SUMMARY = "summary.json"
LINEAR_EVAL = "linear_eval.json"

# The run files a damaged copy of which the run makes again, and how.
# (config.json, which a pretraining run writes at every start, is never
# read by one; see Workdir.read_run_config.)
REBUILT = {
    SUMMARY: "when the run ends (the final evaluation's finished parts are "
             "kept in progress.json)",
}
# What is lost with each other run file when it is moved aside.
_LOST_WITHOUT = {
    PROGRESS: "the summary's initial_grad_norm, and its final_loss and "
              "images_per_sec if training had finished",
    SKIPPED_RECORDS: "the count of the unreadable records it listed",
}


class Workdir:
  """The files of one workdir, local or on object storage.

  Args:
    location: the ``--workdir`` as given (a path or a ``gs://`` URL).
  """

  def __init__(self, location: str | os.PathLike):
    self.location = os.fspath(location)
    self.root: epath.Path = storage.path(self.location)

  def __repr__(self) -> str:
    return f"Workdir({self.location!r})"

  def __str__(self) -> str:
    return self.location

  # ------------------------------------------------------------- paths.
  @property
  def checkpoints(self) -> epath.Path:
    return self.root / "checkpoints"

  @property
  def damaged_checkpoints(self) -> epath.Path:
    return self.root / "damaged_checkpoints"

  @property
  def lease_file(self) -> epath.Path:
    return self.root / "lease.json"

  @property
  def events(self) -> epath.Path:
    """The folder of the event files (TensorBoard's ``--logdir``)."""
    return self.root

  @property
  def profiles(self) -> epath.Path:
    """Where TensorBoard's profile plugin looks: ``plugins/profile``."""
    return self.root / "plugins" / "profile"

  def file_list(self, split: str) -> epath.Path:
    return self.root / "file_lists" / f"{split.replace('/', '__')}.json"

  # --------------------------------------------------------- run files.
  def read_run_file(self, name: str) -> Any | None:
    """The run file ``name`` (one of this module's names), or None.

    Raises:
      UserError: it is damaged and cannot be rebuilt (a damaged one that
        can is None, with a warning).
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
    """The one sentence for a damaged run file the workdir cannot rebuild."""
    kind = SKIPPED_RECORDS if name.startswith("skipped_records.") else name
    return UserError(
        f"{damage}, and the rest of the workdir cannot rebuild it: restore it "
        "from a copy, or move it aside and run the same command again "
        f"(losing {_LOST_WITHOUT.get(kind, 'what it held')}).")

  def write_run_file(self, name: str, content: Any) -> None:
    """Writes the run file ``name`` whole (never half of it).

    Raises:
      UserError: it cannot be written (a read-only or full disk, a bucket
        that refuses): one sentence.
    """
    try:
      storage.write_json_atomic(self.root / name, content)
    except (ValueError, TypeError):  # not JSON: a bug, not the disk's
      raise
    except Exception as error:  # any storage's failure, in one sentence
      raise self.cannot_write(name, one_line(error)) from None

  def cannot_write(self, name: str, why: str) -> UserError:
    """The one sentence for the run file ``name``, which could not be
    written (``why``)."""
    return UserError(
        f"cannot write {self.root / name} ({why}); make the workdir writable "
        "(or free space on its disk) and run the same command again: it "
        "resumes from the newest checkpoint.")

  def read_run_config(self, *, flag: str = "config.pretrain_workdir"
                      ) -> ml_collections.ConfigDict:
    """The config this pretraining run recorded; ``flag`` is what the user
    set to point here, for the messages."""
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
    return ml_collections.ConfigDict(recorded)

  @staticmethod
  def run_config_json(config: ml_collections.ConfigDict) -> Any:
    """``config`` as ``config.json`` holds it (tuples become lists)."""
    return json.loads(config.to_json_best_effort())

  def write_run_config(self, config: ml_collections.ConfigDict) -> None:
    """Writes ``config.json``."""
    self.write_run_file(CONFIG, self.run_config_json(config))

  def mend_run_config(self, config: ml_collections.ConfigDict) -> None:
    """Writes ``config.json`` again, with a warning, where it is missing,
    damaged or not ``config`` (which the run's checkpoints accepted)."""
    try:
      recorded = storage.read_json(self.root / CONFIG)
    except storage.DamagedFile:
      recorded = "damaged"
    wanted = self.run_config_json(config)
    if recorded != wanted:
      logging.warning(
          "%s was %s; written again from this command's config, which the "
          "run's checkpoints accept.", self.root / CONFIG,
          "missing" if recorded is None else "damaged"
          if recorded == "damaged" else "another config's")
      self.write_run_file(CONFIG, wanted)

  def keep_file_list(self, split: str, make: Callable[[], list[Any]], *,
                     process_index: int,
                     agree: Callable[[str], str] | None = None,
                     trust_kept: bool = True) -> list[Any]:
    """The image folder's list of files of ``split`` (entries ``[path,
    size]``; a list kept before sizes were is of paths), kept in
    ``file_lists/<split>.json``: made by ``make()`` at the run's first start
    and written there, read back by every resume, so that a run and its
    resumes see one list whatever is added to the folder. A damaged list is
    made again, with a warning; so is one not ``trust_kept`` (kept by a
    start that never trained: the folder may have been fixed since).

    With ``agree`` (process 0's text on every process, see
    ``core.sharding.broadcast_text``), process 0 alone lists the folder and
    the others read its list, or its one sentence of failure; without,
    every process lists it and process 0 writes it.
    """
    if agree is None or process_index == 0:
      failure = ""
      try:
        files = self._kept_or_made(split, make, write=process_index == 0,
                                   trust_kept=trust_kept)
      except Exception as error:  # the others wait for this process's word
        if agree is None:
          raise
        failure = str(error) if isinstance(error, UserError) else (
            f"cannot list or keep the images of split {split!r} "
            f"({one_line(error)}); check the folder and the workdir.")
      if agree is not None:
        agree(failure)
      if failure:
        raise UserError(failure)
      return files
    failure = agree("")
    if failure:
      raise UserError(failure)
    return self._kept_or_made(split, make, write=False, trust_kept=True)

  def _kept_or_made(self, split: str, make: Callable[[], list[Any]], *,
                    write: bool, trust_kept: bool) -> list[Any]:
    kept = self.file_list(split)
    try:
      files = storage.read_json(kept) if trust_kept else None
    except storage.DamagedFile as damage:
      logging.warning("%s; listing the folder again.", damage)
      files = None
    if isinstance(files, list) and all(_is_entry(f) for f in files):
      return files
    if files is not None:
      logging.warning("%s is not a list of files; listing the folder again.",
                      kept)
    start = time.monotonic()
    files = make()
    logging.info("Listed %d images of split %r in %.1f s; the list is kept "
                 "in %s.", len(files), split, time.monotonic() - start, kept)
    if write:
      kept.parent.mkdir(parents=True, exist_ok=True)
      storage.write_bytes_atomic(kept, json.dumps(files).encode())
    return files

  def read_progress(self) -> Progress:
    """The run's progress so far (a new run's: nothing)."""
    recorded = self.read_run_file(PROGRESS)
    if recorded is None:
      return Progress()
    try:
      return Progress.from_json(recorded)
    except TypeError as error:  # valid JSON, but not a Progress
      raise self._beyond_repair(
          PROGRESS, f"{self.root / PROGRESS} is damaged ({error})") from None

  def write_progress(self, progress: Progress) -> None:
    self.write_run_file(PROGRESS, progress.to_json())

  def skipped_records(self, process_index: int) -> SkippedRecords:
    """Process ``process_index``'s skipped records so far (none for a new
    run)."""
    name = self.skipped_records_name(process_index)
    recorded = self.read_run_file(name)
    try:
      return SkippedRecords.from_json({} if recorded is None else recorded)
    except (AttributeError, TypeError, ValueError) as error:  # not by step
      raise self._beyond_repair(
          name, f"{self.root / name} is damaged ({error})") from None

  @staticmethod
  def skipped_records_name(process_index: int) -> str:
    """The run file of process ``process_index``'s skipped records."""
    return SKIPPED_RECORDS.format(index=process_index)


def _is_entry(entry: Any) -> bool:
  """A kept list's entry: ``[path, size]``, or a path alone."""
  return isinstance(entry, str) or (
      isinstance(entry, list) and len(entry) == 2
      and isinstance(entry[0], str) and isinstance(entry[1], int))


def of_run(location: str | None, *, flag: str = "config.pretrain_workdir"
           ) -> Workdir:
  """The workdir of the pretraining run that ``flag`` names (for the
  messages), which must be set."""
  if not location:
    raise UserError(f"{flag} is not set; pass --{flag.lstrip('-')}=DIR of a "
                    "pretraining run.")
  return Workdir(location)


# How long a workdir on object storage may take to answer at start.
REACH_TIMEOUT_SECS = 15.0


def prepare(location: str | os.PathLike | Workdir) -> Workdir:
  """Creates the workdir (and checks that it can be written) before any
  work.

  Raises UserError, one sentence naming the location and the problem
  (missing bucket, credentials, network, permissions), instead of a
  traceback later in the run. A location on object storage that does not
  answer within ``REACH_TIMEOUT_SECS`` (gcsfs would retry for a minute) is
  such a problem too.
  """
  location = location.location if isinstance(location, Workdir) else location
  storage.check_writable(location, REACH_TIMEOUT_SECS, what="the workdir",
                         remedy="choose another --workdir")
  return Workdir(os.fspath(location))
