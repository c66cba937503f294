"""eqco_jax.program.files.checkpointing: identity checks, read-only readers,
checkpoints written before fields and values were renamed, damaged
checkpoints."""

import gc
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import ROOT, LoggedWarnings, save_as_before_digests
from eqco_jax.core.errors import UserError
from eqco_jax.program.files import checkpointing
from eqco_jax.program.files import lease
from eqco_jax.program.files.workdir import Workdir


def _config(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(dict(
      method="simo", model="resnet10", width=4, small_image_stem=True,
      head="mlp_bn", head_hidden_dim=32, head_out_dim=16, queue_size=64,
      optimizer="sgd", dataset="digits", image_size=32, batch_size=32,
      seed=0, keep_checkpoints=2, checkpoint_every_steps=2))
  c.update(overrides)
  return c


def _state(value: float = 1.0):
  return {"step": jnp.asarray(2, jnp.int32),
          "params": {"w": jnp.full((3, 2), value)}}


def _save(workdir, step, state, config):
  manager = checkpointing.create_manager(Workdir(workdir), config)
  checkpointing.save(manager, step, state, config)
  manager.wait_until_finished()
  manager.close()


def test_save_restore_and_refuse_another_config(tmp_path):
  config = _config()
  _save(tmp_path, 2, _state(3.0), config)
  manager = checkpointing.create_manager(Workdir(tmp_path), config)
  restored = checkpointing.restore_latest(manager, _state(0.0), config)
  np.testing.assert_array_equal(restored["params"]["w"], 3.0)
  other = _config(width=8)
  with pytest.raises(UserError) as error:
    checkpointing.restore_latest(manager, _state(0.0), other)
  assert str(error.value) == (
      f"the checkpoint in {manager.directory} was written with width=4 but "
      "this config has width=8; use a new --workdir or the config that "
      "wrote it.")


def test_a_reader_leaves_a_checkpoint_being_written_alone(tmp_path):
  _save(tmp_path, 2, _state(3.0), _config())
  # What a save in progress looks like: orbax's temporary step directory.
  in_progress = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-12345"
  (in_progress / "state").mkdir(parents=True)
  (in_progress / "state" / "partial").write_text("half a checkpoint")
  with LoggedWarnings() as warnings:
    state = checkpointing.load_state_arrays(Workdir(tmp_path))
  assert not warnings.messages, warnings.messages  # Reading is no warning.
  assert int(state["step"]) == 2
  np.testing.assert_array_equal(state["params"]["w"], 3.0)
  assert (in_progress / "state" / "partial").read_text() == (
      "half a checkpoint")
  # The run's own manager cleans it up when it saves next (so the test
  # would see a reader that cleaned).
  _save(tmp_path, 6, _state(4.0), _config())
  assert not in_progress.exists()


def test_reading_a_workdir_without_checkpoints_says_what_to_do(tmp_path):
  with pytest.raises(UserError, match="holds no checkpoint yet; pretrain "
                                      "first or point at another run"):
    checkpointing.load_state_arrays(Workdir(tmp_path))


def _largest_data_file(step_dir):
  files = [p for p in step_dir.glob("state/**/d/*") if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  data = _largest_data_file(step_dir)
  data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])


def _garble(step_dir):
  data = _largest_data_file(step_dir)
  data.write_bytes(os.urandom(data.stat().st_size))


def _change_a_digest(step_dir):
  """As if a bit of the array had flipped (those of the tests' small states
  are stored inside the index, whose checksum catches it:
  tests/scenarios/test_faults.py flips a real state's)."""
  path = step_dir / "digests" / "digests.json"
  recorded = json.loads(path.read_text())
  recorded["arrays"]["params/w"] = "0" * 64
  path.write_text(json.dumps(recorded))


# Each damage to a complete checkpoint, and the start of the cause the
# warning names.
DAMAGES = {
    "truncated data file": (_truncate, "ValueError: "),
    "deleted data file": (lambda d: _largest_data_file(d).unlink(),
                          "ValueError: "),
    "garbage data file": (_garble, "ValueError: "),
    "garbage manifest": (
        lambda d: (d / "state" / "manifest.ocdbt").write_bytes(b"x" * 64),
        "ValueError: DATA_LOSS: "),
    "emptied _METADATA": (lambda d: (d / "state" / "_METADATA").write_text(""),
                          "JSONDecodeError: Expecting value"),
    "missing state/": (lambda d: shutil.rmtree(d / "state"),
                       "KeyError: 'Item \"state\" was not found"),
    "missing identity/": (lambda d: shutil.rmtree(d / "identity"),
                          "KeyError: 'Item \"identity\" was not found"),
    "missing digests/": (lambda d: shutil.rmtree(d / "digests"),
                         "KeyError: 'Item \"digests\" was not found"),
    "garbage digests": (
        lambda d: (d / "digests" / "digests.json").write_text("{x"),
        "JSONDecodeError: Expecting property name"),
    "a digest that differs": (
        _change_a_digest, "Mismatch: 1 of its 2 arrays read back different "
        "from their saved digests, the first params/w"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_one_before_restores(
    tmp_path, damage):
  damage_fn, cause = DAMAGES[damage]
  config = _config()
  _save(tmp_path, 2, _state(1.0), config)
  _save(tmp_path, 4, _state(2.0), config)
  damage_fn(tmp_path / "checkpoints" / "4")
  checkpointing.check_workdir(Workdir(tmp_path), config)  # reads past it
  with pytest.raises(UserError, match="written with width=4 but this config "
                     "has width=8"):  # and still checks the one before
    checkpointing.check_workdir(Workdir(tmp_path), _config(width=8))
  manager = checkpointing.create_manager(Workdir(tmp_path), config)
  with LoggedWarnings() as warnings:
    restored = checkpointing.restore_latest(manager, _state(0.0), config)
  np.testing.assert_array_equal(restored["params"]["w"], 1.0)
  kept = tmp_path / "damaged_checkpoints" / "4"
  assert len(warnings.messages) == 1, warnings.messages
  start = (f"The checkpoint of step 4 in {tmp_path}/checkpoints is damaged "
           f"({cause}")
  assert warnings.messages[0].startswith(start), warnings.messages
  assert warnings.messages[0].endswith(
      f"); it was moved to {kept} (kept for inspection) and the run resumes "
      "from step 2.")
  assert "\n" not in warnings.messages[0]
  assert manager.all_steps() == [2] and kept.is_dir()
  assert (kept / "_CHECKPOINT_METADATA").exists()  # moved whole
  # The run goes on: its next save of step 4 is a checkpoint like any other.
  checkpointing.save(manager, 4, _state(5.0), config)
  manager.wait_until_finished()
  again = checkpointing.restore_latest(manager, _state(0.0), config)
  np.testing.assert_array_equal(again["params"]["w"], 5.0)


def test_a_checkpoint_written_before_digests_restores_without_a_warning(
    tmp_path):
  """A workdir written before checkpoints had digests resumes, and is read,
  as before; the next save has digests."""
  config = _config()
  save_as_before_digests(tmp_path, 2, _state(3.0), config)
  manager = checkpointing.create_manager(Workdir(tmp_path), config)
  with LoggedWarnings() as warnings:
    restored = checkpointing.restore_latest(manager, _state(0.0), config)
    read = checkpointing.load_state_arrays(Workdir(tmp_path))
  assert not warnings.messages, warnings.messages
  for state in (restored, read):
    np.testing.assert_array_equal(state["params"]["w"], 3.0)
  checkpointing.save(manager, 4, _state(5.0), config)
  checkpointing.wait_until_saved(manager)
  assert (tmp_path / "checkpoints" / "4" / "digests").is_dir()
  manager.close()


def test_no_checkpoint_that_restores_stops_in_one_sentence_moving_nothing(
    tmp_path):
  config = _config()
  _save(tmp_path, 2, _state(1.0), config)
  _save(tmp_path, 4, _state(2.0), config)
  _truncate(tmp_path / "checkpoints" / "4")
  shutil.rmtree(tmp_path / "checkpoints" / "2" / "identity")
  manager = checkpointing.create_manager(Workdir(tmp_path), config)
  with pytest.raises(UserError) as error:
    checkpointing.restore_latest(manager, _state(0.0), config)
  message = str(error.value)
  assert message.startswith(
      f"none of the checkpoints in {tmp_path}/checkpoints can be restored "
      "(step 4: ValueError: ")
  assert "; step 2: KeyError: 'Item \"identity\" was not found" in message
  assert message.endswith(
      "); nothing was moved or deleted: restore them from a copy, or move "
      "the checkpoints folder aside to train from step 0.")
  assert "\n" not in message
  assert manager.all_steps() == [2, 4]
  assert not (tmp_path / "damaged_checkpoints").exists()


def _fill_the_disk(workdir: str) -> None:
  """Run by the test below on a 1 MB tmpfs: a small checkpoint fits, a
  1.4 MB one does not; then the disk grows and the run goes on."""
  config = _config()
  manager = checkpointing.create_manager(Workdir(workdir), config)
  rng = np.random.default_rng(0)
  small = {"step": jnp.asarray(2), "params": {"w": jnp.ones((10, 10))}}
  big = {"step": jnp.asarray(4),
         "params": {"w": jnp.asarray(rng.random((600, 600), np.float32))}}
  checkpointing.save(manager, 2, small, config)
  checkpointing.wait_until_saved(manager)
  with LoggedWarnings("absl", "asyncio") as errors:
    with pytest.raises(UserError) as error:
      checkpointing.save(manager, 4, big, config)
      checkpointing.wait_until_saved(manager)
    del manager  # asyncio reports the failed writes' tasks when collected
    gc.collect()
  message = str(error.value)
  assert message.startswith(
      f"no space left on the device of {workdir}/checkpoints while saving a "
      "checkpoint (a checkpoint takes about 0.0")
  assert message.endswith(
      " MB are free there); free space there, or copy the workdir to a "
      "larger disk and point --workdir at it, then run the same command: it "
      "resumes from step 2, which is intact."), message
  assert not errors.messages, errors.messages  # no library's traceback
  # The same command, once the disk has room, resumes from step 2.
  subprocess.run(["mount", "-o", "remount,size=8m", workdir], check=True)
  manager = checkpointing.create_manager(Workdir(workdir), config)
  restored = checkpointing.restore_latest(manager, jax.tree.map(
      jnp.zeros_like, small), config)
  assert int(restored["step"]) == 2
  np.testing.assert_array_equal(restored["params"]["w"], 1.0)
  checkpointing.save(manager, 4, big, config)
  checkpointing.wait_until_saved(manager)
  assert manager.all_steps() == [2, 4]


def test_a_full_disk_during_a_save_is_one_sentence_and_the_run_resumes(
    tmp_path):
  """On a real full disk: a 1 MB tmpfs mounted in a mount namespace of its
  own (``unshare``, as root or as a user mapped to root)."""
  disk = tmp_path / "disk"
  disk.mkdir()
  script = ("import sys; sys.path[:0] = ['tests', 'tests/program/files']; "
            f"import test_checkpointing; "
            f"test_checkpointing._fill_the_disk({str(disk)!r})")
  result = subprocess.run(
      ["unshare", "--mount", "--map-root-user", "sh", "-c",
       f"mount -t tmpfs -o size=1m tmpfs {disk} && exec "
       f"{sys.executable} -c \"$0\"", script],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert not list(disk.iterdir())  # the tmpfs was the namespace's own


def test_only_the_loop_asks_jaxs_preemption_sync_point(tmp_path,
                                                       monkeypatch):
  """orbax asks reached_preemption in its saves and its finalize thread, for
  older steps too; JAX takes the latest step asked as where a process is.
  The manager answers orbax from the loop's own once-per-step question."""
  asked = []

  def sync_point(step):
    asked.append(step)
    return step == 4

  monkeypatch.setattr(checkpointing.multihost_utils,
                      "reached_preemption_sync_point", sync_point)
  manager = checkpointing.create_manager(Workdir(tmp_path), _config())
  assert [manager.preempted_at(s) for s in (3, 4)] == [False, True]
  assert [manager.reached_preemption(s) for s in (2, 3, 4)] == [
      False, False, True]
  assert asked == [3, 4]  # orbax's questions never reached JAX
  manager.close()


def test_a_save_after_the_lease_was_taken_over_writes_nothing(tmp_path):
  """A run whose workdir another run took over stops at its next save, with
  the lease's one sentence, before orbax writes anything."""
  config = _config()
  with lease.Holding(Workdir(tmp_path)):
    manager = checkpointing.create_manager(Workdir(tmp_path), config)
    checkpointing.save(manager, 2, _state(), config)
    checkpointing.wait_until_saved(manager)
    (tmp_path / "lease.json").write_text(json.dumps(
        {"host": "host-b", "pid": 4242, "since": 1764979200.0,
         "renewed": 1764979200.0, "token": "theirs"}))
    with pytest.raises(lease.LeaseTaken, match="this run stopped at step 4 "
                       "without saving it"):
      checkpointing.save(manager, 4, _state(), config)
    checkpointing.wait_until_saved(manager)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
  manager.close()
