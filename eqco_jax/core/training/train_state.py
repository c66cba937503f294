"""The one pytree a pretraining run carries from step to step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct

from eqco_jax.core.types import PyTree


class TrainState(struct.PyTreeNode):
  """Everything that changes during pretraining, and nothing else.

  Attributes:
    step: int32 scalar, the number of optimizer steps taken.
    params: online (query) encoder parameters, backbone + head.
    batch_stats: online encoder BatchNorm running statistics.
    momentum_params: key encoder parameters, an EMA of ``params``.
    momentum_batch_stats: key encoder BatchNorm running statistics (its own).
    opt_state: optax state of the online parameters.
    key_data: uint32 raw data of the run's base PRNG key (what a checkpoint
      can hold); each step folds the step number into the key, so it never
      needs updating. Checkpoints written before it was named ``key_data``
      call it ``rng``.
    queue: MoCo's ``[Q, D]`` L2-normalised keys (FIFO); None for SiMo,
      which keeps no queue.
    queue_ptr: int32 scalar, the row where the next keys are written; None
      without a queue.
  """
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  momentum_params: PyTree
  momentum_batch_stats: PyTree
  opt_state: optax.OptState
  key_data: jax.Array
  queue: jax.Array | None
  queue_ptr: jax.Array | None

  def step_key(self) -> jax.Array:
    """The PRNG key of the current step (a typed key array)."""
    return jax.random.fold_in(jax.random.wrap_key_data(self.key_data), self.step)


def ema_update(target: PyTree, online: PyTree, momentum: float) -> PyTree:
  """``target <- momentum * target + (1 - momentum) * online``, leaf by leaf."""
  return jax.tree.map(
      lambda t, o: momentum * t + (1.0 - momentum) * o.astype(t.dtype),
      target, online)


def copy_tree(tree: PyTree) -> PyTree:
  """A copy with fresh buffers (so that the state can be donated)."""
  return jax.tree.map(jnp.copy, tree)
