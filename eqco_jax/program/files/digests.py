"""Digests of a checkpoint's arrays, written with it and checked when it is
read back, so that an array that reads back different from what was saved
is found (a flipped bit that the storage and the file formats let through:
orbax's data files carry no checksum of the values).

Each checkpoint holds, besides the train state, an item ``digests``: JSON
``{"algorithm": "sha256", "arrays": {path: hex digest}}``, the SHA-256 of
each array's dtype, shape and bytes, by its path in the state
(``params/backbone/conv1/kernel``; the same path whether the state is read
back as a ``TrainState`` or as nested dicts).

The state is replicated: process 0 copies its replica to the host when the
save starts (the next step donates the device buffers) and hashes it in the
save's background, with the writes of the state itself. A restore hashes
what it read on each process (:func:`differences`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from eqco_jax.program.files import storage

ITEM = "digests"
ALGORITHM = "sha256"
_FILENAME = "digests.json"
_STEP_METADATA = "_CHECKPOINT_METADATA"  # orbax's record of a step's items


class Mismatch(ValueError):
  """A restored array differs from the digest saved with it."""


def path_name(keypath: tuple[Any, ...]) -> str:
  """``params/backbone/conv1/kernel``: a leaf's path, whatever the tree's
  node types (dataclass fields, dicts, tuples)."""
  return jax.tree_util.keystr(keypath, simple=True, separator="/")


def host_arrays(tree: Any) -> dict[str, np.ndarray]:
  """This process's host copy of each array of ``tree``, by path (one
  replica of a replicated array)."""
  def host(leaf: Any) -> np.ndarray:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      if not leaf.sharding.is_fully_replicated:
        raise ValueError("the digests of a checkpoint need its arrays "
                         "replicated or on this process's devices")
      leaf = leaf.addressable_data(0)
    return np.asarray(leaf)
  return {path_name(path): host(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def digest(array: np.ndarray) -> str:
  """The hex SHA-256 of ``array``'s dtype, shape and bytes."""
  array = np.ascontiguousarray(array)
  hashed = hashlib.sha256(f"{array.dtype.name} {array.shape} ".encode())
  hashed.update(array.reshape(-1).view(np.uint8))  # bfloat16 has no buffer
  return hashed.hexdigest()


def record(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """The item's JSON: the digest of each of ``arrays`` (path: array)."""
  return {"algorithm": ALGORITHM,
          "arrays": {path: digest(a) for path, a in arrays.items()}}


def differences(recorded: Mapping[str, Any], tree: Any) -> str | None:
  """What of ``tree`` (a restored state) differs from the digests
  ``recorded`` with it, in a few words; None if nothing does."""
  if recorded.get("algorithm") != ALGORITHM:
    return f"its digests are of an unknown kind ({recorded.get('algorithm')})"
  saved = recorded["arrays"]
  found = record(host_arrays(tree))["arrays"]
  differ = sorted(p for p in saved.keys() | found.keys()
                  if saved.get(p) != found.get(p))
  if not differ:
    return None
  return (f"{len(differ)} of its {len(saved)} arrays read back different "
          f"from their saved digests, the first {differ[0]}")


def written_with(manager: ocp.CheckpointManager, step: int) -> bool:
  """Whether checkpoint ``step`` of ``manager`` was written with digests:
  it holds the item, or orbax's record of its items lists it (then the
  item was lost). Checkpoints written before digests existed have neither;
  one that has them and restores read back exactly as it was saved."""
  step_dir = storage.path(manager.directory) / str(step)
  if (step_dir / ITEM).exists():
    return True
  try:
    items = json.loads((step_dir / _STEP_METADATA).read_text())
    return ITEM in items["item_handlers"]
  except (OSError, ValueError, KeyError, TypeError):
    return False  # unreadable: orbax's restore judges that file


def restore_state(manager: ocp.CheckpointManager, step: int,
                  target: Any) -> Any:
  """The item ``state`` of checkpoint ``step`` restored into ``target``
  (shapes, dtypes and shardings), checked against its digests where it has
  them (:func:`written_with`; one without is taken as it reads).

  Raises:
    Mismatch: an array read back different from what was saved.
  """
  items = {"state": ocp.args.StandardRestore(target)}
  if written_with(manager, step):
    items[ITEM] = Restore()
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  different = ITEM in items and differences(restored[ITEM], restored["state"])
  if different:
    raise Mismatch(different)
  return restored["state"]


class Handler(ocp.AsyncCheckpointHandler):
  """Saves and restores the item :data:`ITEM` (the JSON of :func:`record`);
  the hashing runs in the save's background, on process 0."""

  async def async_save(self, directory: epath.Path, args: Save
                       ) -> list[ocp.future.Future]:
    if jax.process_index() != 0:
      return []
    arrays = host_arrays(args.state)  # now: the next step donates the state

    async def write() -> None:
      (directory / _FILENAME).write_text(json.dumps(record(arrays)))
    return [ocp.future.CommitFutureAwaitingContractedSignals(
        write(), name="digests")]

  def save(self, directory: epath.Path, args: Save) -> None:
    if jax.process_index() == 0:
      (directory / _FILENAME).write_text(json.dumps(record(host_arrays(
          args.state))))

  def restore(self, directory: epath.Path, args: Restore | None = None
              ) -> dict[str, Any]:
    del args
    return json.loads((directory / _FILENAME).read_text())


@ocp.args.register_with_handler(Handler, for_save=True)
@dataclasses.dataclass
class Save(ocp.args.CheckpointArgs):
  """The digests of ``state`` (a pytree of arrays)."""
  state: Any


@ocp.args.register_with_handler(Handler, for_restore=True)
@dataclasses.dataclass
class Restore(ocp.args.CheckpointArgs):
  """The recorded digests."""
