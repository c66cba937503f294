"""Checkpoints of a run (orbax): save, keep the last few, resume, refuse
strangers, read another run's without touching it.

Each checkpoint holds the whole ``TrainState`` (online and momentum encoders,
optimizer, queue, PRNG key, step) and a small JSON record of the config
fields that change what is trained (``run_identity``). The data position
needs no saving: the input pipeline is a pure function of (seed, step).
Orbax writes into a temporary directory and renames it when complete, so a
half-written checkpoint is never seen by ``latest_step``.
"""

from __future__ import annotations

import logging as python_logging
from typing import Any

import flax.serialization
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from eqco_jax.core import config as config_lib
from eqco_jax.core import run_identity
from eqco_jax.core.errors import UserError
from eqco_jax.program.workdir import Workdir

# TrainState fields renamed since older checkpoints were written: new -> old.
_RENAMED_STATE_FIELDS = {"key_data": "rng"}


def identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config fields recorded with each checkpoint (``run_identity``)."""
  return run_identity.identity(config)


def create_manager(workdir: str, config: ml_collections.ConfigDict
                   ) -> ocp.CheckpointManager:
  """A manager of ``workdir/checkpoints``: async, keeps the last few."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints,
      enable_async_checkpointing=True,
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(Workdir(workdir).checkpoints, options=options,
                               item_handlers=_item_handlers())


class _WithoutReadOnlyNotice(python_logging.Filter):
  """Drops orbax's warning that a read-only manager is read-only: reading a
  run's checkpoints read-only is what we ask for, not something to warn a
  user about at every start."""

  def filter(self, record: python_logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Given directory is read only")


def open_read_only(workdir: str) -> ocp.CheckpointManager:
  """A manager that reads another run's checkpoints and never writes, deletes
  or cleans anything there (that run may still be writing)."""
  absl_logger = python_logging.getLogger("absl")
  quiet = _WithoutReadOnlyNotice()
  absl_logger.addFilter(quiet)
  try:
    return ocp.CheckpointManager(
        Workdir(workdir).checkpoints,
        options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                             save_interval_steps=0),
        item_handlers=_item_handlers())
  finally:
    absl_logger.removeFilter(quiet)


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
  return {"state": ocp.StandardCheckpointHandler(),
          "identity": ocp.JsonCheckpointHandler()}


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         config: ml_collections.ConfigDict) -> None:
  """Starts an asynchronous save of ``state`` as checkpoint ``step``, with
  the identity of ``config``; the caller decides when one is due."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      identity=ocp.args.JsonSave(identity(config))), force=True)


def check_identity(manager: ocp.CheckpointManager, step: int,
                   config: ml_collections.ConfigDict) -> None:
  """Raises UserError if checkpoint ``step`` was written by another config.

  The message names the first differing field, its recorded value and the
  new one. Fields the checkpoint does not record (written before they were
  part of the identity) are not compared, and a warning names them.
  """
  saved = config_lib.upgrade_names(manager.restore(
      step, args=ocp.args.Composite(identity=ocp.args.JsonRestore()))[
          "identity"])
  wanted = identity(config)
  different = run_identity.first_difference(saved, wanted)
  if different:
    field, theirs, ours = different
    raise UserError(
        f"the checkpoint in {manager.directory} was written with "
        f"{field}={theirs!r} but this config has {field}={ours!r}; use a new "
        "--workdir or the config that wrote it.")
  unchecked = run_identity.unrecorded(saved, wanted)
  if unchecked:
    logging.warning(
        "The checkpoint of step %d in %s does not record %s (written before "
        "they were checked); resuming with this config's values.", step,
        manager.directory, ", ".join(unchecked))


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Raises UserError unless ``workdir``'s newest checkpoint, if any, was
  written by a config of the same identity. Reads only; cheap enough to run
  before anything is built or compiled."""
  with open_read_only(workdir) as manager:
    step = manager.latest_step()
    if step is not None:
      check_identity(manager, step, config)


def restore_latest(manager: ocp.CheckpointManager, state: Any,
                   config: ml_collections.ConfigDict) -> Any:
  """The latest complete checkpoint restored into ``state``'s structure and
  shardings, or ``state`` itself when there is none."""
  step = manager.latest_step()
  if step is None:
    return state
  check_identity(manager, step, config)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  saved_fields = set(manager.item_metadata(step)["state"])
  renamed = {new: old for new, old in _RENAMED_STATE_FIELDS.items()
             if old in saved_fields and new not in saved_fields}
  if not renamed:
    return _restore_state(manager, step, abstract)
  # Restored under the names it was saved with, then renamed.
  target = {renamed.get(name, name): value for name, value
            in flax.serialization.to_state_dict(abstract).items()}
  restored = _restore_state(manager, step, target)
  for new, old in renamed.items():
    restored[new] = restored.pop(old)
  return flax.serialization.from_state_dict(state, restored)


def _restore_state(manager: ocp.CheckpointManager, step: int,
                   target: Any) -> Any:
  return manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target)))["state"]


def load_state_arrays(workdir: str, step: int | None = None) -> Any:
  """A checkpoint's train state as a plain pytree of arrays on one device.

  For inspection and export, whatever the device count that wrote it. The
  tree is the state's fields as nested dicts; ``step=None`` means the latest.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with open_read_only(workdir) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise UserError(f"{workdir}/checkpoints holds no checkpoint yet; "
                      "pretrain first or point at another run.")
    metadata = manager.item_metadata(step)["state"]
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        metadata)
    return manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]
