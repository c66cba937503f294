"""eqco_jax.program.run.train end to end, as a user runs it: devices, kills,
resumes, a stranger's checkpoint, the summary."""

import json
import os
import re
import shutil
import signal
import time

import numpy as np
import tensorboard_loaders
from tensorboard.backend.event_processing import event_accumulator

from helpers import LONG, LONG_STEPS, SHARED_RUN, assert_same_tree
from helpers import checkpoint_steps, load_state, run, run_failing, start
from helpers import wait_for_checkpoint


def _strict_json(path):
  """``path`` read by a strict JSON parser (NaN and Infinity refused)."""
  def refuse(constant):
    raise ValueError(f"{constant} in {path}")
  return json.loads(path.read_text(), parse_constant=refuse)


def _signal_at(workdir, line, signum, *overrides):
  """Starts the run, sends ``signum`` once it logs ``line``, and returns
  its return code and log."""
  process = start(workdir, *overrides)
  log = []
  for text in process.stderr:
    log.append(text)
    if line in text:
      process.send_signal(signum)
      break
  _, rest = process.communicate(timeout=120)
  return process.returncode, "".join(log) + rest


def test_quickstart_as_documented_writes_summary_and_same_loss_on_1_and_8_devices(
    quickstart_as_documented, eight_device_run):
  eight_dir, eight_result = eight_device_run
  one_dir, one_result = quickstart_as_documented
  assert "Would install eqco-jax" in one_result.stdout
  one = json.loads((one_dir / "summary.json").read_text())
  eight = json.loads((eight_dir / "summary.json").read_text())
  assert "pretrained" in eight_result.stdout
  assert "random init" in eight_result.stdout
  assert one["num_devices"] == 1 and eight["num_devices"] == 8
  for key in ("method", "steps", "final_loss", "images_per_sec", "knn_top1",
              "linear_top1", "baseline_linear_top1"):
    assert key in one, key
  assert one["method"] == "simo" and one["steps"] == 8
  np.testing.assert_allclose(one["final_loss"], eight["final_loss"], rtol=1e-5)
  # TensorBoard event files and the run's config for later evaluation.
  files = os.listdir(one_dir)
  assert any(name.startswith("events.out.tfevents") for name in files)
  assert "config.json" in files


# A training log line (clu's LoggingWriter): "[process 0/1] [STEP] ...loss=".
LOSS_LINE = re.compile(r"\] \[(\d+)\] .*\bloss=")
# The tags whose values a resumed run logs as the uninterrupted one does.
TRAINING_TAGS = ("loss", "top1", "top5", "grad_norm", "learning_rate")


def _killed(workdir, moment) -> None:
  """Starts LONG on ``workdir`` (resuming it) and SIGKILLs it at ``moment``:
  "checkpoint", as soon as a new checkpoint is complete; "log", as soon as
  it logs a step (whose checkpoint is then most often still being saved);
  "between", a few steps after the checkpoint of the step it logged."""
  newest = checkpoint_steps(workdir)[-1]
  process = start(workdir, *LONG)
  try:
    if moment != "checkpoint":
      logged = next(int(m[1]) for m in map(LOSS_LINE.search, process.stderr)
                    if m)
      newest = logged - 1 if moment == "between" else None
    while newest is not None and checkpoint_steps(workdir)[-1] <= newest:
      assert process.poll() is None, "it ended before the moment"
      time.sleep(0.02)
    time.sleep(0.3 if moment == "between" else 0)  # 10 steps take ~1 s
  finally:
    process.kill()
  _, log = process.communicate(timeout=120)
  assert process.returncode == -signal.SIGKILL, log[-2000:]


def test_ctrl_c_then_the_same_command_resumes_from_the_cache_to_the_same_state(
    tmp_path, long_run):
  """A second run on a workdir in use is refused in one sentence and writes
  nothing; a SIGINT (Ctrl-C) saves a checkpoint at the step reached and
  exits 0 with one line, as a SIGTERM does (test_stopping.py); SIGKILLs at 3 moments
  (right after a checkpoint, after a log before its checkpoint is saved,
  between checkpoints) lose nothing; the same command (here with a trace of
  3 steps) resumes with its train step from the persistent compilation
  cache and ends in the uninterrupted run's state, with one event file per
  start in which TensorBoard's loaders find every logged step once, with
  the uninterrupted run's values."""
  workdir = tmp_path / "term"
  process = start(workdir, *LONG)
  # While it holds the workdir (held still here), a second run is refused.
  deadline = time.time() + 240
  while not (workdir / "lease.json").exists():
    assert process.poll() is None and time.time() < deadline
    time.sleep(0.05)
  process.send_signal(signal.SIGSTOP)
  before = sorted(p.name for p in workdir.iterdir())
  second = run_failing(workdir, *LONG)
  assert second.stderr.strip().splitlines()[-1].startswith(
      f"error: the workdir {workdir} is in use by the run of pid "
      f"{process.pid} on ")
  assert sorted(p.name for p in workdir.iterdir()) == before
  process.send_signal(signal.SIGCONT)
  wait_for_checkpoint(process, workdir)
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-2000:]
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
  match = [line for line in stderr.splitlines() if "after SIGINT" in line]
  assert len(match) == 1 and match[0].endswith(
      "after SIGINT; the checkpoint is saved, run the same command to "
      "resume."), stderr[-2000:]
  stopped = int(match[0].split("Stopped at step ")[1].split()[0])
  assert checkpoint_steps(workdir)[-1] == stopped < LONG_STEPS
  assert not (workdir / "summary.json").exists()

  for moment in ("checkpoint", "log", "between"):
    _killed(workdir, moment)
  resumed = run(workdir, *LONG, "--config.profile_steps=3")
  assert "Resumed from the checkpoint of step " in resumed.stderr
  assert "(a hit of the persistent compilation cache)" in resumed.stderr
  assert_same_tree(load_state(long_run, LONG_STEPS),
                   load_state(workdir, LONG_STEPS))
  assert list(workdir.glob("plugins/profile/*/*.xplane.pb"))
  assert len(list(workdir.glob("events.out.tfevents.*"))) == 5
  loader = event_accumulator.EventAccumulator(str(workdir))
  loader.Reload()
  logged = {tag: [(e.step, e.value) for e in loader.Scalars(tag)]
            for tag in loader.Tags()["scalars"]}
  uninterrupted = event_accumulator.EventAccumulator(str(long_run))
  uninterrupted.Reload()
  assert [step for step, _ in logged["loss"]] == list(range(10, 61, 10))
  # The log step after the SIGINT's averages only the steps after it.
  partial = -(-stopped // 10) * 10 if stopped % 10 else None
  for tag in TRAINING_TAGS:
    expected = [(e.step, e.value) for e in uninterrupted.Scalars(tag)]
    for shown in (logged[tag],
                  tensorboard_loaders.python_loader_scalars(workdir, tag)):
      assert [step for step, _ in shown] == [step for step, _ in expected]
      assert [point for point in shown if point[0] != partial] == [
          point for point in expected if point[0] != partial], tag
  for tag in ("step_time", "data_wait_fraction", "images_per_sec",
              "images_per_sec_per_device"):
    assert logged[tag] and all(v >= 0 for _, v in logged[tag]), tag
  assert all(0 <= v <= 1 for _, v in logged["data_wait_fraction"])
  assert "mfu" not in logged  # a CPU's peak FLOP/s is not in the table
  assert tensorboard_loaders.python_loader_hparams(workdir) == 1


def test_checkpoint_from_another_config_is_refused(tmp_path,
                                                  eight_device_run):
  workdir = tmp_path / "other"
  shutil.copytree(eight_device_run[0], workdir)
  recorded = (workdir / "config.json").read_bytes()
  result = run_failing(workdir, *SHARED_RUN, "--config.width=8")
  assert "was written with width=4 but this config has width=8" in (
      result.stderr)
  assert (workdir / "config.json").read_bytes() == recorded
  assert checkpoint_steps(workdir) == [4, 8]


def test_a_run_counts_its_skipped_record_in_the_summary(tmp_path, jpeg_tfds):
  workdir = tmp_path / "run"
  result = run(workdir, "--config.dataset=cifar10",
               f"--config.data_dir={jpeg_tfds.data_dir}",
               "--config.batch_size=10", "--config.num_train_steps=5",
               "--config.checkpoint_every_steps=5",
               "--config.log_every_steps=5", "--config.final_eval=False")
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["skipped_records"] == 1 and summary["steps"] == 5
  bad_id = jpeg_tfds.truncated_id
  # One line for the log interval of steps 1-5.
  assert result.stderr.count("Skipped ") == 1
  assert "Skipped 1 unreadable image(s) in the batches of steps 1-5" in (
      result.stderr)
  assert bad_id in result.stderr
  recorded = json.loads(
      (workdir / "skipped_records.process_0.json").read_text())
  assert sum(recorded.values(), []) == [bad_id]


# Signals sent to one workdir's runs, one run each, in this order: the signal,
# the log line at which it is sent, and whether the pretrained backbone's
# part of the evaluation was done by then (by an earlier run).
KILLS_IN_THE_FINAL_EVALUATION = (
    (signal.SIGTERM, "Final evaluation, pretrained backbone.", False),
    (signal.SIGKILL, "Final evaluation, baseline backbone.", False),
    (signal.SIGINT, "Final evaluation, baseline backbone.", True),
)


def test_damage_and_kills_in_the_final_evaluation_end_in_the_uninterrupted_run(
    tmp_path, quickstart_as_documented):
  """Resumed past a damaged newest checkpoint, then killed at each moment
  of the final evaluation, the same command ends in the state and the
  summary of the uninterrupted run (the quick start's, SHARED_RUN on one
  device), valid strict JSON; a finished part of the evaluation is not run
  again, and a SIGTERM or a SIGINT there first writes the training's events. (Each
  damage to a checkpoint and to a record, one by one: test_checkpointing.py
  and test_workdir.py.)"""
  reference = _strict_json(quickstart_as_documented[0] / "summary.json")
  workdir = tmp_path / "run"
  shutil.copytree(quickstart_as_documented[0], workdir)
  for name in ("summary.json", "lease.json", *(
      p.name for p in workdir.glob("events.out.tfevents.*"))):
    (workdir / name).unlink(missing_ok=True)
  # As if killed as the final evaluation began: none of it is recorded.
  progress = json.loads((workdir / "progress.json").read_text())
  progress["final_evaluation"] = {}
  (workdir / "progress.json").write_text(json.dumps(progress))
  # The newest checkpoint damaged: moved aside, steps 5-8 trained again.
  data = max(workdir.glob("checkpoints/8/state/**/d/*"),
             key=lambda p: p.stat().st_size)
  data.write_bytes(data.read_bytes()[:100])
  pretrained = "Final evaluation, pretrained backbone."
  baseline = "Final evaluation, baseline backbone."

  # The first run resumes past the damage and trains steps 5-8; each run
  # then meets its signal at its moment of the evaluation.
  for signum, moment, finished_before in KILLS_IN_THE_FINAL_EVALUATION:
    code, log = _signal_at(workdir, moment, signum, *SHARED_RUN)
    if signum != signal.SIGKILL:  # stops at once, events kept, exit 0
      assert code == 0, log[-3000:]
      assert (f"Stopped in the final evaluation after {signum.name}"
              in log)
    else:
      assert code == -signal.SIGKILL, log[-3000:]
    assert (f"{pretrained[:-1]}: done before." in log) == finished_before
    assert not (workdir / "summary.json").exists()
    if signum == signal.SIGTERM and not finished_before:  # the first run
      assert (f"The checkpoint of step 8 in {workdir}/checkpoints is "
              "damaged (ValueError: ") in log
      assert (workdir / "damaged_checkpoints" / "8" / "state").is_dir()
      assert_same_tree(load_state(quickstart_as_documented[0], 8),
                       load_state(workdir, 8))
      loader = event_accumulator.EventAccumulator(str(workdir))
      loader.Reload()
      assert [e.step for e in loader.Scalars("loss")] == [8]
  done = run(workdir, *SHARED_RUN).stderr
  assert f"{pretrained[:-1]}: done before." in done and baseline in done
  finished = _strict_json(workdir / "summary.json")
  # Its steps 5-8 ran again, so their images/s differ.
  assert finished["images_per_sec"] > 0
  assert finished | {"images_per_sec": 0} == reference | {
      "images_per_sec": 0}


def test_a_finished_runs_lost_files_are_made_again_without_evaluating(
    tmp_path, quickstart_as_documented):
  """The summary of a finished run comes back from progress.json alone, and
  its config.json (deleted, or edited to another valid config) from the
  config its checkpoints accept: nothing built, restored or evaluated (in
  this process, on its 8 devices, which the summary records)."""
  from helpers import load_config  # pylint: disable=g-import-not-at-top
  from eqco_jax.program.run import train  # pylint: disable=g-import-not-at-top

  reference = _strict_json(quickstart_as_documented[0] / "summary.json")
  workdir = tmp_path / "run"
  shutil.copytree(quickstart_as_documented[0], workdir)
  (workdir / "summary.json").unlink()
  config = load_config("quickstart.py", "tiny")
  for flag in SHARED_RUN:  # --config.FIELD=INT
    field, value = flag.removeprefix("--config.").split("=")
    config[field] = int(value)
  recorded = _strict_json(workdir / "config.json")
  # config.json edited to another valid config: the run's own comes back.
  (workdir / "config.json").write_text(json.dumps(recorded | {"width": 8}))
  before = [p.name for p in workdir.iterdir()]
  summary = train.train_and_evaluate(config, str(workdir))
  assert summary == reference | {"num_devices": 8}
  assert _strict_json(workdir / "summary.json") == summary
  assert sorted(p.name for p in workdir.iterdir()) == sorted(
      before + ["summary.json"])  # no events, nothing else
  assert _strict_json(workdir / "config.json") == recorded
  # config.json deleted: the same call writes it again.
  (workdir / "config.json").unlink()
  assert train.train_and_evaluate(config, str(workdir)) == summary
  assert _strict_json(workdir / "config.json") == recorded
