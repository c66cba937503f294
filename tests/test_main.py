"""The training program end to end, as a user runs it: devices, kills, resumes."""

import json
import os
import shutil
import signal

import numpy as np

from helpers import ROOT, checkpoint_steps
from helpers import LONG, LONG_STEPS, SHARED_RUN, run, run_failing, start
from helpers import wait_for_checkpoint


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


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  workdir = tmp_path / "term"
  process = start(workdir, *LONG)
  wait_for_checkpoint(process, workdir)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-2000:]
  match = [line for line in stderr.splitlines() if "after SIGTERM" in line]
  assert match, stderr[-2000:]
  stopped = int(match[0].split("Stopped at step ")[1].split()[0])
  assert checkpoint_steps(workdir)[-1] == stopped < LONG_STEPS
  assert not (workdir / "summary.json").exists()


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


def test_linear_eval_on_features_reads_a_pretraining_workdir(
    tmp_path, eight_device_run):
  """(The image-level variant runs in test_documented_commands, on ImageNet.)"""
  pretrain = eight_device_run[0]
  config = os.path.join(ROOT, "configs", "linear_eval.py") + ":features"
  workdir = tmp_path / "linear"
  result = run(workdir, f"--config.pretrain_workdir={pretrain}",
               "--config.epochs=3", "--config.standardize=True",
               "--config.learning_rate=0.3", config=config)
  report = json.loads((workdir / "linear_eval.json").read_text())
  assert report["pretrain_step"] == 8
  assert 0.0 <= report["top1"] <= report["top5"] <= 1.0
  # Chance is 0.1; 1,000 test digits put 0.12 two standard errors above it.
  assert report["top1"] > 0.12
  assert "linear evaluation: top-1" in result.stdout


def test_linear_eval_without_pretraining_run_says_what_to_do(tmp_path):
  config = os.path.join(ROOT, "configs", "linear_eval.py") + ":features"
  result = run_failing(tmp_path / "x",
                       f"--config.pretrain_workdir={tmp_path}/none",
                       config=config)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: {tmp_path}/none/config.json does not exist; point "
      "config.pretrain_workdir at the --workdir of a pretraining run.")
