"""What the run files of a pretraining run hold, besides its config: the
progress the summary needs (``progress.json``) and each process's unreadable
records (``skipped_records.process_I.json``), as the loop keeps them.
The workdir (``workdir.Workdir``) reads and writes them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging


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
