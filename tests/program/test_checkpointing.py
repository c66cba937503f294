"""eqco_jax.program.checkpointing: identity checks, read-only readers,
checkpoints written before fields and values were renamed."""

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from eqco_jax.core.errors import UserError
from eqco_jax.program import checkpointing


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
  manager = checkpointing.create_manager(str(workdir), config)
  checkpointing.save(manager, step, state, config)
  manager.wait_until_finished()
  manager.close()


def test_save_restore_and_refuse_another_config(tmp_path):
  config = _config()
  _save(tmp_path, 2, _state(3.0), config)
  manager = checkpointing.create_manager(str(tmp_path), config)
  restored = checkpointing.restore_latest(manager, _state(0.0), config)
  np.testing.assert_array_equal(restored["params"]["w"], 3.0)
  other = _config(width=8)
  with pytest.raises(UserError) as error:
    checkpointing.restore_latest(manager, _state(0.0), other)
  assert str(error.value) == (
      f"the checkpoint in {manager.directory} was written with width=4 but "
      "this config has width=8; use a new --workdir or the config that "
      "wrote it.")


class _Records(logging.Handler):
  """Keeps the messages of WARNING and above."""

  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def test_a_reader_leaves_a_checkpoint_being_written_alone(tmp_path):
  _save(tmp_path, 2, _state(3.0), _config())
  # What a save in progress looks like: orbax's temporary step directory.
  in_progress = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-12345"
  (in_progress / "state").mkdir(parents=True)
  (in_progress / "state" / "partial").write_text("half a checkpoint")
  warnings = _Records()
  logging.getLogger("absl").addHandler(warnings)
  try:
    state = checkpointing.load_state_arrays(str(tmp_path))
  finally:
    logging.getLogger("absl").removeHandler(warnings)
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
    checkpointing.load_state_arrays(str(tmp_path))


def test_a_checkpoint_of_an_older_version_resumes_under_todays_names(
    tmp_path):
  """Written before ``TrainState.rng`` became ``key_data`` and SiMo's head
  ``simo`` became ``mlp_bn``."""
  from eqco_jax.core.train_state import TrainState  # pylint: disable=g-import-not-at-top
  old_config = _config(head="simo")
  fields = dict(step=jnp.asarray(6, jnp.int32), params={"w": jnp.ones(3)},
                batch_stats={"m": jnp.ones(2)},
                momentum_params={"w": jnp.ones(3)},
                momentum_batch_stats={"m": jnp.ones(2)},
                opt_state={"v": jnp.ones(3)}, queue=None, queue_ptr=None)
  _save(tmp_path, 6, dict(fields, rng=jnp.asarray([1, 2], jnp.uint32)),
        old_config)
  fresh = TrainState(key_data=jnp.zeros(2, jnp.uint32), **jax.tree.map(
      jnp.zeros_like, fields))
  manager = checkpointing.create_manager(str(tmp_path), _config())
  restored = checkpointing.restore_latest(manager, fresh, _config())
  assert isinstance(restored, TrainState) and int(restored.step) == 6
  np.testing.assert_array_equal(restored.key_data, [1, 2])
  np.testing.assert_array_equal(restored.params["w"], 1.0)
  with pytest.raises(UserError, match="written with head='mlp_bn' but this "
                     "config has head='mlp'"):
    checkpointing.restore_latest(manager, fresh, _config(head="mlp"))
