"""eqco_jax.program.run.bookkeeping: the summary made from what the run kept,
a finished run's summary made again, and the table printed."""

import pytest

from helpers import LoggedWarnings, load_config
from eqco_jax.program.files.run_files import Progress, SkippedRecords
from eqco_jax.program.files.workdir import Workdir
from eqco_jax.program.run import bookkeeping

PROGRESS = Progress(
    step=8, first_interval={"grad_norm": 9.5, "loss": 11.0},
    last_interval={"grad_norm": 3.0, "loss": 7.0}, timed_steps=4,
    timed_seconds=2.0,
    final_evaluation={"pretrained": {"knn_top1": 0.9, "linear_top1": 0.95,
                                     "linear_top5": 0.99},
                      "baseline": {"knn_top1": 0.4, "linear_top1": 0.5,
                                   "linear_top5": 0.9}})


def test_the_summary_is_what_the_run_kept():
  config = load_config("quickstart.py", "tiny")
  skipped = SkippedRecords({3: ["a"], 9: ["b", "c"]})
  summary = bookkeeping.summary(config, PROGRESS, total_steps=8,
                                num_devices=2, skipped=skipped)
  assert summary == {
      "method": "simo", "dataset": "digits", "model": "resnet10",
      "eqco": True, "alpha": 65536.0, "num_negatives": 31, "steps": 8,
      "batch_size": 32, "num_devices": 2, "final_loss": 7.0,
      "initial_grad_norm": 9.5, "images_per_sec": 4 * 32 / 2.0,
      "skipped_records": 1, "knn_top1": 0.9, "linear_top1": 0.95,
      "linear_top5": 0.99, "baseline_knn_top1": 0.4,
      "baseline_linear_top1": 0.5, "baseline_linear_top5": 0.9}
  # Training not kept to its end: its loss is not known.
  short = bookkeeping.summary(config, PROGRESS, total_steps=10,
                              num_devices=2, skipped=skipped)
  assert short["final_loss"] is None


def test_a_finished_runs_summary_is_made_again_only_when_it_can_be(tmp_path):
  config = load_config("quickstart.py", "tiny")
  workdir = Workdir(tmp_path)
  options = dict(total_steps=8, num_devices=1, skipped=SkippedRecords())
  undone = Progress(step=8, final_evaluation={"pretrained": {}})
  assert bookkeeping.finished_summary(config, workdir, undone,
                                      **options) is None
  made = bookkeeping.finished_summary(config, workdir, PROGRESS, **options)
  assert made["linear_top1"] == 0.95
  assert workdir.read_run_file("summary.json") == made
  assert (tmp_path / "config.json").exists()


def test_the_table_has_the_readmes_columns():
  summary = bookkeeping.summary(load_config("quickstart.py", "tiny"),
                                PROGRESS, total_steps=8, num_devices=1,
                                skipped=SkippedRecords({2: ["a", "b"]}))
  lines = bookkeeping.summary_table(summary).splitlines()
  assert lines[0] == ("simo on digits: 8 steps, final loss 7.0000, 64 "
                      "images/s, 2 unreadable image(s) skipped")
  assert lines[1].split() == ["encoder", "kNN", "top-1", "linear", "top-1",
                              "linear", "top-5"]
  assert lines[2].split() == ["pretrained", "0.9000", "0.9500", "0.9900"]
  assert lines[3].split() == ["random", "init", "0.4000", "0.5000", "0.9000"]
  # Without the random-init baseline: its row only; without skips: no word.
  del summary["baseline_linear_top1"]
  summary["skipped_records"] = 0
  lines = bookkeeping.summary_table(summary).splitlines()
  assert lines[0].endswith("64 images/s") and len(lines) == 3


def test_skipped_records_are_logged_once_an_interval():
  skipped = SkippedRecords({3: ["a"], 4: ["b", "c"], 5: ["d"], 9: ["e"]})
  with LoggedWarnings() as logged:
    for began, step in ((0, 5), (5, 8), (8, 10)):
      bookkeeping.log_skipped(skipped, began=began, step=step)
  assert logged.messages == [
      "Skipped 4 unreadable image(s) in the batches of steps 1-5: a, b, c "
      "and 1 more; other images of their batches took their places.",
      "Skipped 1 unreadable image(s) in the batches of steps 9-10: e; other "
      "images of their batches took their places."]


@pytest.mark.parametrize("final_eval, baseline, evaluated", [
    (False, True, set()), (True, False, {"pretrained"}),
    (True, True, {"pretrained", "baseline"})])
def test_the_backbones_the_final_evaluation_evaluates(final_eval, baseline,
                                                     evaluated):
  config = load_config("quickstart.py", "tiny")
  config.final_eval, config.final_eval_baseline = final_eval, baseline
  assert bookkeeping.evaluated_backbones(config) == evaluated


def test_only_an_interval_from_step_0_is_the_runs_first():
  """A run whose progress.json was lost does not know its first interval:
  the summary's initial_grad_norm is then null, not a later one's."""
  metrics = {"grad_norm": 4.4, "loss": 9.0}
  lost = bookkeeping.record_interval(None, Progress(), 60, metrics, began=50,
                                     timed_steps=0, timed_seconds=0.0)
  assert lost.first_interval is None
  first = bookkeeping.record_interval(None, Progress(), 10, metrics, began=0,
                                      timed_steps=0, timed_seconds=0.0)
  assert first.first_interval == metrics
  later = bookkeeping.record_interval(None, first, 20, {"grad_norm": 2.0},
                                      began=10, timed_steps=0,
                                      timed_seconds=0.0)
  assert later.first_interval == metrics
  summary = bookkeeping.summary(load_config("quickstart.py", "tiny"), lost,
                                total_steps=60, num_devices=1,
                                skipped=SkippedRecords())
  assert summary["initial_grad_norm"] is None
