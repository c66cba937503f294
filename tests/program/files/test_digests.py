"""eqco_jax.program.files.digests: what a digest covers, paths that do not
depend on the tree's node types, what was saved is what is hashed, and
which checkpoints have digests. (A damaged checkpoint found by its digests:
test_checkpointing.py and tests/scenarios/test_faults.py.)"""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import struct

from helpers import save_as_before_digests, tiny_config
from eqco_jax.program.files import checkpointing
from eqco_jax.program.files import digests
from eqco_jax.program.files.workdir import Workdir


def test_a_digest_covers_every_bit_the_dtype_and_the_shape():
  array = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
  seen = {digests.digest(array)}
  words = array.view(np.uint32)
  for bit in range(32):  # each bit of one element
    flipped = words.copy()
    flipped[1, 2] ^= np.uint32(1 << bit)
    seen.add(digests.digest(flipped.view(np.float32)))
  seen.add(digests.digest(words))  # the same bytes as another dtype
  seen.add(digests.digest(array.reshape(4, 3)))  # or another shape
  assert len(seen) == 35
  # The values count, not their layout in memory.
  assert digests.digest(np.asfortranarray(array)) == digests.digest(array)
  for special in (np.float32(2.5), array.astype(ml_dtypes.bfloat16),
                  np.array([True, False])):  # 0-d, no buffer protocol, bool
    assert len(digests.digest(special)) == 64


@struct.dataclass
class _State:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def test_paths_are_the_same_for_a_state_and_the_dicts_it_reads_back_as():
  state = _State(step=jnp.int32(3), params={"dense": {"kernel": jnp.ones(2)}},
                 opt_state=optax.sgd(0.1, momentum=0.9).init(
                     {"dense": {"kernel": jnp.ones(2)}}))
  as_dicts = {"step": state.step, "params": state.params,
              "opt_state": [{"trace": state.opt_state[0].trace}, {}]}
  names = list(digests.host_arrays(state))
  assert names == ["step", "params/dense/kernel",
                   "opt_state/0/trace/dense/kernel"]
  assert sorted(digests.host_arrays(as_dicts)) == sorted(names)
  recorded = digests.record(digests.host_arrays(state))
  assert digests.differences(recorded, as_dicts) is None


def test_differences_count_the_arrays_that_read_back_different():
  tree = {"a": np.zeros(3, np.float32), "b": np.ones(2, np.int32),
          "c": np.arange(4.0)}
  recorded = digests.record(digests.host_arrays(tree))
  changed = dict(tree, c=np.arange(4.0) + 1)
  changed["a"] = changed["a"].copy()
  changed["a"][2] = -0.0  # another bit pattern of an equal value
  assert digests.differences(recorded, changed) == (
      "2 of its 3 arrays read back different from their saved digests, "
      "the first a")
  assert digests.differences(recorded, {"a": tree["a"], "b": tree["b"]}) == (
      "1 of its 3 arrays read back different from their saved digests, "
      "the first c")
  assert digests.differences(dict(recorded, algorithm="md5"), tree) == (
      "its digests are of an unknown kind (md5)")


def test_the_save_hashes_the_state_as_it_was_when_the_save_began(tmp_path):
  """The train step donates the state after the save returns: the digests
  must come from the host copy taken before it, not from the arrays."""
  config = tiny_config("simo")
  values = np.random.default_rng(1).standard_normal((256, 256))
  state = {"step": jnp.int32(2), "params": {"w": jnp.asarray(values)}}
  expected = digests.record(digests.host_arrays(state))
  manager = checkpointing.create_manager(Workdir(tmp_path), config)
  checkpointing.save(manager, 2, state, config)
  for leaf in jax.tree.leaves(state):
    leaf.delete()  # as donated: gone before the background hashing
  checkpointing.wait_until_saved(manager)
  written = tmp_path / "checkpoints" / "2" / "digests" / "digests.json"
  assert json.loads(written.read_text()) == expected
  assert digests.written_with(manager, 2)
  manager.close()


def test_which_checkpoints_have_digests(tmp_path):
  """Those written before digests existed have neither the item nor a
  mention of it; one whose item was lost is still known to have had it."""
  config = tiny_config("simo")
  state = {"step": jnp.int32(2), "params": {"w": jnp.ones(3)}}
  save_as_before_digests(tmp_path, 2, state, config)
  manager = checkpointing.create_manager(Workdir(tmp_path), config)
  checkpointing.save(manager, 4, state, config)
  checkpointing.wait_until_saved(manager)
  assert not digests.written_with(manager, 2)
  assert digests.written_with(manager, 4)
  shutil.rmtree(tmp_path / "checkpoints" / "4" / "digests")
  assert digests.written_with(manager, 4)
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = digests.restore_state(manager, 2, target)
  np.testing.assert_array_equal(restored["params"]["w"], 1.0)
  with pytest.raises(KeyError, match='Item "digests" was not found'):
    digests.restore_state(manager, 4, target)
  manager.close()
