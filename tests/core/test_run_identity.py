"""A restart with another config: refused before anything is built, naming
the field, the stored value and the new one; harmless fields may change."""

import pytest

from eqco_jax.core import config as config_lib
from eqco_jax.core import run_identity
from eqco_jax.core.errors import UserError
from eqco_jax.program.files import checkpointing
from eqco_jax.program.files.workdir import Workdir

import jax.numpy as jnp

# The fields the issue names, by their names here.
NAMED = ("eqco", "alpha", "num_negatives", "temperature", "ema_momentum",
         "bn_group_size", "symmetric", "shuffle_bn", "augment.crop_scale",
         "augment.blur_prob", "augment.hue", "base_learning_rate",
         "warmup_steps", "num_train_steps", "num_epochs", "method", "width",
         "seed", "batch_size", "dataset")


def _base(method: str):
  c = config_lib.default_config()
  if method == "mocov2":
    c.update(method="mocov2", head="mlp", bn_group_size=32)
  return c


def _set(config, name, value) -> None:
  *parents, leaf = name.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  node[leaf] = value


def _get(config, name):
  return run_identity.flatten(config)[name]


def _changed(config, name):
  """``config`` with field ``name`` set to another value of its type."""
  value = _get(config, name)
  if isinstance(value, bool):
    new = not value
  elif isinstance(value, int):
    new = value + 1
  elif isinstance(value, float):
    new = value * 2 + 0.5
  elif isinstance(value, str):
    new = value + "_other"
  elif isinstance(value, (tuple, list)):  # () = a default (mean, std)
    new = tuple(v / 2 for v in value) or (0.5, 0.5, 0.5)
  else:  # None: an int field (num_negatives, bn_group_size) or a str one.
    new = 3
  changed = config_lib.default_config()
  changed.update(config.to_dict())
  try:
    _set(changed, name, new)
  except TypeError:
    _set(changed, name, "train[:50%]")
  return changed


def _save(workdir, config) -> None:
  manager = checkpointing.create_manager(Workdir(workdir), config)
  checkpointing.save(manager, 2, {"w": jnp.ones(3)}, config)
  manager.wait_until_finished()
  manager.close()


def test_every_field_that_changes_training_is_refused_by_name(tmp_path):
  refused = set()
  for method in ("simo", "mocov2"):
    base = _base(method)
    workdir = tmp_path / method
    _save(workdir, base)
    checkpointing.check_workdir(Workdir(workdir), base)  # Same config: resumes.
    directory = workdir.resolve() / "checkpoints"
    for name in run_identity.identity(base):
      changed = _changed(base, name)
      theirs = run_identity.identity(base)[name]
      ours = run_identity.identity(changed)[name]
      if theirs == ours:  # A field this method ignores (SiMo's queue).
        checkpointing.check_workdir(Workdir(workdir), changed)
        continue
      with pytest.raises(UserError) as error:
        checkpointing.check_workdir(Workdir(workdir), changed)
      assert str(error.value) == (
          f"the checkpoint in {directory} was written with {name}={theirs!r}"
          f" but this config has {name}={ours!r}; use a new --workdir or "
          "the config that wrote it."), name
      refused.add(name)
  assert set(NAMED) <= refused
  # Every field but the declared harmless ones is refused by one method.
  everything = set(run_identity.flatten(_base("simo")))
  harmless = {n for n in everything if any(
      n == f or n.startswith(f + ".") for f in run_identity.NOT_IDENTITY)}
  assert refused == everything - harmless


@pytest.mark.parametrize("name", [
    "keep_checkpoints", "log_every_steps", "checkpoint_every_steps",
    "eval_every_steps", "data_dir", "final_eval", "linear_eval.epochs",
    "augment.eval_crop_scale", "augment.on_device", "remat",
    "eval_batch_size"])
def test_cadence_location_and_evaluation_fields_may_change(tmp_path, name):
  base = _base("simo")
  _save(tmp_path, base)
  changed = _changed(base, name)
  assert _get(changed, name) != _get(base, name)
  checkpointing.check_workdir(Workdir(tmp_path), changed)


def test_a_checkpoint_that_predates_a_field_is_checked_on_the_rest(
    tmp_path, monkeypatch):
  base = _base("simo")
  recorded = {k: v for k, v in run_identity.identity(base).items()
              if k != "temperature"}
  monkeypatch.setattr(checkpointing, "identity", lambda config: recorded)
  _save(tmp_path, base)
  monkeypatch.undo()
  base.temperature = 0.5  # Not recorded: not compared (a warning says so).
  checkpointing.check_workdir(Workdir(tmp_path), base)
  base.width = 8
  with pytest.raises(UserError, match="written with width=64 but this "
                                      "config has width=8"):
    checkpointing.check_workdir(Workdir(tmp_path), base)


def test_a_workdir_without_checkpoints_accepts_any_config(tmp_path):
  checkpointing.check_workdir(Workdir(tmp_path / "new"), _base("simo"))
  assert not (tmp_path / "new").exists()
