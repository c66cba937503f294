"""eqco_jax.program.run.stopping: a diverging run stops with its last finite
checkpoint and exits non-zero; a SIGTERM or a SIGINT stops it cleanly."""

import math
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import checkpoint_steps, environment, load_state, run_failing
from eqco_jax.program.files.workdir import Workdir
from eqco_jax.program.run import stopping


class _Manager:
  """What Stopping asks of a checkpoint manager."""
  directory = "/runs/x/checkpoints"
  workdir = Workdir("/runs/x")

  def preempted_at(self, step):
    del step
    return False

  def wait_until_finished(self):
    pass

  def latest_step(self):
    return 4

  def all_steps(self):
    return [2, 4]


def _metrics(loss, grad_norm):
  return {"loss": jnp.float32(loss), "grad_norm": jnp.float32(grad_norm),
          "top1": jnp.float32(math.nan)}  # Not watched.


def test_the_earliest_non_finite_watched_metric_is_named():
  pending = [_metrics(1.0, 2.0), _metrics(1.5, math.inf),
             _metrics(math.nan, math.nan)]
  assert stopping.first_non_finite(pending, 11) == (12, "grad_norm",
                                                      math.inf)
  found = stopping.first_non_finite(pending[2:], 13)
  assert found[:2] == (13, "loss") and math.isnan(found[2])
  assert stopping.first_non_finite(pending[:1], 11) is None
  assert stopping.first_non_finite([], 11) is None


def test_a_state_is_finite_only_when_every_float_array_is():
  state = {"w": jnp.ones((3, 2)), "step": jnp.int32(4),
           "key": jax.random.key(0)}
  assert stopping.state_is_finite(state)
  state["w"] = state["w"].at[1, 1].set(jnp.inf)
  assert not stopping.state_is_finite(state)


def test_a_diverging_run_stops_before_saving_and_keeps_finite_checkpoints(
    tmp_path):
  # lr 1e7 per 256 diverges after a few warm-up steps; a checkpoint every
  # step (2 kept) means more saves than kept before it does.
  result = run_failing(
      tmp_path, "--config.base_learning_rate=1e7",
      "--config.num_train_steps=40", "--config.checkpoint_every_steps=1",
      "--config.keep_checkpoints=2", "--config.log_every_steps=4",
      "--config.final_eval=False")
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  match = re.fullmatch(
      r"error: training diverged at step (\d+): (loss was nan|loss was inf|"
      r"grad_norm was nan|grad_norm was inf|the train state holds "
      r"non-finite values); nothing non-finite was saved and the newest "
      r"checkpoint, step (\d+) in (\S+), is finite; lower base_learning_rate"
      r" \(or raise warmup_steps\) and start again in a new --workdir\.",
      last)
  assert match, last
  step, newest = int(match.group(1)), int(match.group(3))
  # Every step was checked before its save: the run stopped at the first
  # non-finite step, within one log interval, without saving it.
  assert 2 < newest == step - 1 < 40
  assert checkpoint_steps(tmp_path) == [newest - 1, newest]
  assert "loss=nan" not in result.stderr
  for saved in checkpoint_steps(tmp_path):
    state = load_state(tmp_path, saved)
    assert int(state["step"]) == saved
    for leaf in jax.tree.leaves(state):
      leaf = np.asarray(leaf)
      if np.issubdtype(leaf.dtype, np.floating):
        assert np.all(np.isfinite(leaf))
  assert not (tmp_path / "summary.json").exists()


def test_after_step_checks_metrics_at_log_steps_and_the_state_before_saves():
  with stopping.Stopping(_Manager(), log_every_steps=5) as stop:
    bad = [_metrics(1.0, 2.0), _metrics(math.nan, 1.0)]
    finite_state = {"w": jnp.ones(2)}
    # Step 7 is neither a log step nor a save: nothing is checked yet.
    assert not stop.after_step(7, bad, finite_state, saving=False,
                               last=False)
    with pytest.raises(stopping.Diverged) as error:
      stop.after_step(10, bad, finite_state, saving=False, last=False)
    assert str(error.value).startswith(
        "training diverged at step 10: loss was nan; nothing non-finite was "
        "saved and the newest checkpoint, step 4 in /runs/x/checkpoints, is "
        "finite; ")
    good = [_metrics(1.0, 2.0)]
    bad_state = {"w": jnp.array([1.0, jnp.inf])}
    assert not stop.after_step(11, good, bad_state, saving=False, last=False)
    with pytest.raises(stopping.Diverged, match="at step 12: the train state "
                       "holds non-finite values"):
      stop.after_step(12, good, bad_state, saving=True, last=False)


def test_a_divergence_right_after_a_resume_says_so(tmp_path):
  """Found by the first check after resuming from step 4: a checkpoint
  without digests is named as suspect, with where to move it; one whose
  digests showed it read back as saved is not (moving it aside would only
  train to the same divergence). A later check is a plain divergence."""
  bad, state = [_metrics(math.nan, 1.0)], {"w": jnp.ones(2)}
  with stopping.Stopping(_Manager(), log_every_steps=5,
                         resumed_from=4) as stop:
    with pytest.raises(stopping.Diverged) as error:
      stop.after_step(5, bad, state, saving=False, last=False)
    assert str(error.value) == (
        "training diverged at step 5: loss was nan, right after resuming "
        "from the checkpoint of step 4, which has no digests to check it by "
        "and may be damaged; nothing non-finite was saved: move "
        "/runs/x/checkpoints/4 to /runs/x/damaged_checkpoints/4 and run the "
        "same command, which resumes from step 2.")
    with pytest.raises(stopping.Diverged, match=r"^training diverged at step "
                       r"10: loss was nan; nothing non-finite was saved"):
      stop.after_step(10, bad, state, saving=False, last=False)
  checked = _Manager()
  checked.directory = str(tmp_path)
  (tmp_path / "4" / "digests").mkdir(parents=True)
  with stopping.Stopping(checked, log_every_steps=5, resumed_from=4) as stop:
    with pytest.raises(stopping.Diverged) as error:
      stop.after_step(5, bad, state, saving=False, last=False)
  assert str(error.value) == (
      "training diverged at step 5: loss was nan, right after resuming from "
      "the checkpoint of step 4, which read back exactly as it was saved; "
      f"nothing non-finite was saved and the newest checkpoint, step 4 in "
      f"{tmp_path}, is finite; lower base_learning_rate (or raise "
      "warmup_steps) and start again in a new --workdir.")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_are_remembered_and_the_old_handlers_restored(
    signum):
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  state = {"w": jnp.ones(2)}
  with stopping.Stopping(_Manager(), log_every_steps=1) as stop:
    assert not stop.after_step(1, [], state, saving=False, last=False)
    os.kill(os.getpid(), signum)
    assert stop.received == stop.reason == signal.Signals(signum).name
    assert not stop.after_step(2, [], state, saving=False, last=True)
    assert stop.after_step(2, [], state, saving=False, last=False)
    # After a Ctrl-C, the next one ends the process at once.
    assert (signal.getsignal(signal.SIGINT) == signal.SIG_DFL) == (
        signum == signal.SIGINT)
  assert {s: signal.getsignal(s) for s in before} == before
  assert jax.process_count() == 1


def test_a_signal_interrupts_between_items_and_an_ignored_sigint_stays_so():
  with stopping.Interrupts() as interrupts:
    items = stopping.checked(iter([1, 2, 3]), interrupts)
    assert next(items) == 1
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(stopping.Interrupted, match="^SIGINT$"):
      next(items)
  before = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    with stopping.Interrupts() as interrupts:
      assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
      os.kill(os.getpid(), signal.SIGINT)
      interrupts.check()
      assert interrupts.received is None and interrupts.reason == "SIGTERM"
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
  finally:
    signal.signal(signal.SIGINT, before)


def test_in_a_multi_process_run_sigint_goes_to_jaxs_sigterm_handler(
    monkeypatch):
  """JAX's preemption service keeps SIGTERM (here a Python stand-in for
  its handler); a SIGINT becomes a SIGTERM to it and stops nothing alone."""
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  notices = []
  before = signal.signal(signal.SIGTERM, lambda *_: notices.append(1))
  try:
    with stopping.Stopping(_Manager(), log_every_steps=1) as stop:
      os.kill(os.getpid(), signal.SIGINT)
      assert notices == [1]
      assert stop.received is None and stop.reason == "SIGINT"
      assert not stop.after_step(1, [], {"w": jnp.ones(2)}, saving=False,
                                 last=False)
      stop.check()  # one process alone never stops
  finally:
    signal.signal(signal.SIGTERM, before)


PARKED_EXIT = """
import sys, time
from eqco_jax.program.run import stopping

class SlowToTearDown:  # as tf.data's iterator, waiting for its threads
  def __del__(self):
    time.sleep(60)

stopping.exit_if_stopped()  # nothing parked: returns
stopping.park(SlowToTearDown())
print("saved", flush=False)
stopping.exit_if_stopped()
print("not reached")
"""


def test_a_stopped_process_exits_at_once_without_tearing_down_its_pipeline():
  started = time.monotonic()
  result = subprocess.run([sys.executable, "-c", PARKED_EXIT],
                          capture_output=True, text=True, timeout=60,
                          env=environment(1))
  assert (result.returncode, result.stdout) == (0, "saved\n"), result.stderr
  assert time.monotonic() - started < 30  # not the 60 s teardown
