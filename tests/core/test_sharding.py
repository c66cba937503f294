"""eqco_jax.core.sharding: the one mesh and the two shardings."""

import jax
import numpy as np
import pytest

from eqco_jax.core import sharding
from eqco_jax.core.errors import UserError


def test_a_batch_is_split_on_the_data_axis_and_the_state_replicated():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ("data",) and mesh.devices.size == 8
  local = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  batch = sharding.to_global_array(local, mesh)
  assert batch.shape == (16, 3)
  assert batch.sharding == sharding.batch_sharding(mesh)
  assert [s.data.shape for s in batch.addressable_shards] == [(2, 3)] * 8
  np.testing.assert_array_equal(np.asarray(batch), local)
  replicated = jax.device_put(np.ones(3), sharding.replicated(mesh))
  assert replicated.sharding.is_fully_replicated
  assert sharding.make_mesh(jax.devices()[:2]).devices.size == 2


def test_a_batch_that_does_not_split_is_one_sentence():
  mesh = sharding.make_mesh()
  sharding.check_divisible(64, mesh)
  with pytest.raises(UserError) as error:
    sharding.check_divisible(60, mesh)
  assert str(error.value) == (
      "batch_size=60 is not divisible by the 8 devices of the mesh; choose "
      "a multiple of 8.")
