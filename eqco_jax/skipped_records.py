"""The unreadable records a run skipped, kept in its workdir across restarts.

Each process keeps its own ``skipped_records.process_I.json``: the record
ids its pipeline left out, by step (``data.pipeline.SkippedRecords``). A
restart re-reads it, and re-running a step records the same ids for the
same step, so the count over steps 1..N is the same however often the run
was interrupted. The summary's ``skipped_records`` sums all processes.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from eqco_jax import files
from eqco_jax.data import pipeline


def _path(workdir: str):
  return (files.path(workdir) /
          f"skipped_records.process_{jax.process_index()}.json")


def load(workdir: str) -> pipeline.SkippedRecords:
  """This process's skipped records so far (none for a new run)."""
  recorded = files.read_json(_path(workdir)) or {}
  return pipeline.SkippedRecords(
      {int(step): records for step, records in recorded.items()})


def save(workdir: str, skipped: pipeline.SkippedRecords) -> None:
  """Writes this process's record, if it skipped anything."""
  if skipped.by_step:
    files.write_json_atomic(
        _path(workdir), {str(s): r for s, r in sorted(skipped.by_step.items())})


def total(skipped: pipeline.SkippedRecords, through_step: int) -> int:
  """Records skipped by steps 1..``through_step`` on all processes."""
  count = skipped.count(through_step)
  if jax.process_count() == 1:
    return count
  counts = multihost_utils.process_allgather(np.asarray(count, np.int64))
  return int(np.sum(counts))
