"""The device mesh and the two shardings every part of eqco-jax agrees on.

One 1-axis mesh named ``data`` spans every device of every process. Batches are
sharded along their leading axis on ``data``; the train state is replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from eqco_jax.core.errors import UserError
from eqco_jax.core.types import PyTree

DATA_AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """Returns a 1-D mesh named ``data`` over ``devices`` (default: all devices)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a global batch: leading axis split over ``data``."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of anything every device holds in full (params, optimizer state)."""
  return NamedSharding(mesh, PartitionSpec())


def check_divisible(global_batch_size: int, mesh: Mesh) -> None:
  """Raises UserError unless the global batch splits evenly over the mesh."""
  num_devices = mesh.devices.size
  if global_batch_size % num_devices:
    raise UserError(
        f"batch_size={global_batch_size} is not divisible by the {num_devices} "
        f"devices of the mesh; choose a multiple of {num_devices}.")


def to_global_array(local: np.ndarray, mesh: Mesh) -> jax.Array:
  """Assembles this process's slice of a batch into a global sharded array."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh), local)


def place(values: PyTree, shardings: jax.sharding.Sharding | PyTree
          ) -> PyTree:
  """Host arrays that every process holds whole (a checkpoint read back,
  a file's weights) as global arrays with ``shardings``: one for every
  leaf, or a tree of them shaped like ``values``. Works across processes,
  each one placing its own devices' parts."""
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, values)

  def one(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding,
                                        lambda index: value[index])

  return jax.tree.map(one, values, shardings)


def broadcast_text(text: str) -> str:
  """Process 0's ``text`` on every process (the others pass anything); a
  collective: every process calls it at the same point."""
  if jax.process_count() == 1:
    return text
  data = np.frombuffer(text.encode(), np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
  if not size:
    return ""
  padded = np.zeros(size, np.uint8)
  padded[:min(size, data.size)] = data[:size]
  return bytes(np.asarray(
      multihost_utils.broadcast_one_to_all(padded))).decode()
