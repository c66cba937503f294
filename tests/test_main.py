"""The training program end to end, as a user runs it: devices, kills, resumes."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from eqco_jax import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "configs", "quickstart.py") + ":tiny"


def command(workdir, *overrides, config=QUICK):
  return [sys.executable, "-m", "eqco_jax.main", f"--config={config}",
          f"--workdir={workdir}", *overrides]


def environment(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def run(workdir, *overrides, devices=1, timeout=300):
  result = subprocess.run(command(workdir, *overrides), cwd=ROOT,
                          env=environment(devices), capture_output=True,
                          text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def checkpoint_steps(workdir) -> list[int]:
  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    return []
  return sorted(int(name) for name in os.listdir(path) if name.isdigit())


def load_state(workdir, step):
  """The raw arrays of a checkpoint's train state, on one device."""
  return checkpointing.load_state_arrays(str(workdir), step)


def assert_same_tree(a, b, rtol=0.0):
  leaves_a = jax.tree_util.tree_leaves_with_path(a)
  leaves_b = jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
  for (path, x), (_, y) in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               err_msg=jax.tree_util.keystr(path))


def test_quickstart_tiny_writes_summary_and_same_loss_on_1_and_8_devices(
    tmp_path):
  summaries = []
  for devices in (1, 8):
    workdir = tmp_path / f"d{devices}"
    result = run(workdir, devices=devices)
    summary = json.loads((workdir / "summary.json").read_text())
    summaries.append(summary)
    assert "pretrained" in result.stdout and "random init" in result.stdout
  one, eight = summaries
  assert one["num_devices"] == 1 and eight["num_devices"] == 8
  for key in ("method", "steps", "final_loss", "images_per_sec", "knn_top1",
              "linear_top1", "baseline_linear_top1"):
    assert key in one, key
  assert one["method"] == "simo" and one["steps"] == 6
  np.testing.assert_allclose(one["final_loss"], eight["final_loss"], rtol=1e-5)
  # TensorBoard event files and the run's config for later evaluation.
  files = os.listdir(tmp_path / "d1")
  assert any(name.startswith("events.out.tfevents") for name in files)
  assert "config.json" in files


def _start(workdir, overrides):
  return subprocess.Popen(command(workdir, *overrides), cwd=ROOT,
                          env=environment(1), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(process, workdir, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if checkpoint_steps(workdir):
      return
    if process.poll() is not None:
      raise AssertionError("run ended before its first checkpoint: "
                           + process.stderr.read()[-2000:])
    time.sleep(0.05)
  process.kill()
  raise AssertionError("no checkpoint appeared in time")


# Long enough that a kill lands mid-run; checkpoints every 10 steps.
LONG = ("--config.num_train_steps=120", "--config.checkpoint_every_steps=10",
        "--config.log_every_steps=10", "--config.final_eval=False")


def test_sigkill_then_same_command_equals_uninterrupted_run(tmp_path):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  run(straight, *LONG)
  process = _start(killed, LONG)
  wait_for_checkpoint(process, killed)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL
  interrupted_at = checkpoint_steps(killed)
  assert interrupted_at and max(interrupted_at) < 120
  result = run(killed, *LONG)
  assert "Resumed from the checkpoint of step" in result.stderr
  assert checkpoint_steps(straight)[-1] == checkpoint_steps(killed)[-1] == 120
  assert_same_tree(load_state(straight, 120), load_state(killed, 120))
  a = json.loads((straight / "summary.json").read_text())
  b = json.loads((killed / "summary.json").read_text())
  assert a["final_loss"] == b["final_loss"]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  workdir = tmp_path / "term"
  process = _start(workdir, LONG)
  wait_for_checkpoint(process, workdir)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-2000:]
  match = [line for line in stderr.splitlines() if "after SIGTERM" in line]
  assert match, stderr[-2000:]
  stopped = int(match[0].split("Stopped at step ")[1].split()[0])
  assert checkpoint_steps(workdir)[-1] == stopped < 120
  assert not (workdir / "summary.json").exists()


def test_checkpoint_from_another_config_is_refused(tmp_path):
  workdir = tmp_path / "other"
  run(workdir, "--config.final_eval=False")
  result = subprocess.run(
      command(workdir, "--config.final_eval=False", "--config.width=8"),
      cwd=ROOT, env=environment(1), capture_output=True, text=True,
      timeout=300)
  assert result.returncode != 0
  assert "was written with width=4 but this config has width=8" in (
      result.stderr)


@pytest.mark.parametrize("variant, overrides", [
    ("features", ["--config.epochs=3", "--config.standardize=True",
                  "--config.learning_rate=0.3"]),
    ("imagenet", ["--config.epochs=1", "--config.batch_size=64",
                  "--config.learning_rate=1.0",
                  "--config.eval_batch_size=128",
                  "--config.checkpoint_every_steps=20"]),
])
def test_linear_eval_reads_a_pretraining_workdir(tmp_path, variant, overrides):
  pretrain = tmp_path / "pretrain"
  run(pretrain, "--config.final_eval=False")
  config = os.path.join(ROOT, "configs", "linear_eval.py") + ":" + variant
  workdir = tmp_path / "linear"
  result = subprocess.run(
      command(workdir, f"--config.pretrain_workdir={pretrain}", *overrides,
              config=config),
      cwd=ROOT, env=environment(1), capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((workdir / "linear_eval.json").read_text())
  assert report["pretrain_step"] == 6
  # Chance is 0.1; 1,000 test digits put 0.12 two standard errors above it.
  assert 0.12 < report["top1"] <= report["top5"] <= 1.0
  assert "linear evaluation: top-1" in result.stdout
  if variant == "imagenet":
    # 4000 // 64 = 62 steps, a checkpoint every 20 and at the end, the last 2 kept.
    assert checkpoint_steps(workdir) == [60, 62]


def test_linear_eval_without_pretraining_run_says_what_to_do(tmp_path):
  config = os.path.join(ROOT, "configs", "linear_eval.py") + ":features"
  result = subprocess.run(
      command(tmp_path / "x", f"--config.pretrain_workdir={tmp_path}/none",
              config=config),
      cwd=ROOT, env=environment(1), capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: {tmp_path}/none/config.json does not exist; point "
      "config.pretrain_workdir at the --workdir of a pretraining run.")
