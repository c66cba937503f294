"""eqco_jax.program.files.run_files: the progress and the skipped records a
run keeps, read back as they were written, and refused when not of their
shape."""

import json
import time

import pytest

from helpers import LoggedWarnings
from eqco_jax.program.files.run_files import BackgroundWrites, Progress
from eqco_jax.program.files.run_files import SkippedRecords


def test_skipped_records_count_each_step_once():
  skipped = SkippedRecords()
  skipped.add(3, ["shard-0__7"])
  skipped.add(3, ["shard-0__7"])  # a resumed run reads step 3 again
  skipped.add(9, ["shard-1__2", "shard-1__5"])
  assert (skipped.count(2), skipped.count(8), skipped.count(9)) == (0, 1, 3)
  again = SkippedRecords.from_json(json.loads(json.dumps(skipped.to_json())))
  assert again.by_step == skipped.by_step


def test_progress_reads_back_as_written():
  progress = Progress(step=8, first_interval={"grad_norm": 2.5},
                      last_interval={"loss": 7.0}, timed_steps=4,
                      timed_seconds=1.5,
                      final_evaluation={"pretrained": {"knn_top1": 0.5}})
  assert Progress.from_json(json.loads(json.dumps(progress.to_json()))) == (
      progress)


@pytest.mark.parametrize("kind, recorded", [
    (Progress, [8]), (Progress, {"steps": 8}), (SkippedRecords, ["x"]),
    (SkippedRecords, {"three": ["x"]})])
def test_json_of_another_shape_is_refused(kind, recorded):
  with pytest.raises((TypeError, ValueError)):
    kind.from_json(recorded)


def _failing(*failures: Exception):
  """A write that raises ``failures`` in turn, then writes into the dict
  returned with it."""
  failures, written = list(failures), {}

  def write(name, content):
    if failures:
      raise failures.pop()
    written[name] = content

  return write, written


def test_background_writes_retry_and_never_raise_into_the_caller():
  write, written = _failing(*[OSError("bucket unavailable")] * 2)
  writes = BackgroundWrites(write)
  writes.RETRY_SECS = 0.01
  with LoggedWarnings() as warnings:
    writes.put("progress.json", {"step": 1})
    writes.put("progress.json", {"step": 2})  # the newest content wins
    assert writes.close(timeout=10) == {}
  assert written == {"progress.json": {"step": 2}}
  assert len(warnings.messages) == 2 and warnings.messages[0].startswith(
      "Could not write progress.json (OSError: bucket unavailable); trying "
      "again in ")


def test_what_cannot_be_written_is_said_when_flushed():
  def write(name, content):
    raise OSError("Read-only file system")

  writes = BackgroundWrites(write)
  writes.put("progress.json", {"step": 1})
  with LoggedWarnings():
    assert writes.close(timeout=0.5) == {
        "progress.json": "OSError: Read-only file system"}


def test_a_flush_tries_a_failed_write_again_at_once(monkeypatch):
  """A write that failed waits out its delay (up to a minute) unless the
  run's end flushes: then it is tried again at once, and a disk fixed by
  then gets it."""
  write, written = _failing(OSError("No space left on device"))
  monkeypatch.setattr(BackgroundWrites, "RETRY_SECS", 600.0)
  writes = BackgroundWrites(write)
  with LoggedWarnings() as warnings:
    writes.put("progress.json", {"step": 1})
    while not warnings.messages:  # failed once, waiting 600 s
      time.sleep(0.01)
    assert writes.close(timeout=5) == {}
  assert written == {"progress.json": {"step": 1}}
