"""MoCo v2: negatives from a FIFO queue of past keys; Shuffle BN on the keys."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from eqco_jax.core import losses
from eqco_jax.core.methods.base import KeyForward, Metrics


def init_queue(rng: jax.Array, queue_size: int, dim: int) -> jax.Array:
  """``[queue_size, dim]`` random unit vectors, as MoCo starts its queue."""
  return losses.l2_normalize(jax.random.normal(rng, (queue_size, dim)))


def enqueue(queue: jax.Array, ptr: jax.Array, keys: jax.Array
            ) -> tuple[jax.Array, jax.Array]:
  """Writes ``keys [B, D]`` over the oldest rows; returns (queue, new ptr).

  ``queue_size`` must be a multiple of B (checked with the config), so a
  block never straddles the end and the pointer wraps to 0 exactly.
  """
  queue_size, batch = queue.shape[0], keys.shape[0]
  queue = jax.lax.dynamic_update_slice(
      queue, keys.astype(queue.dtype), (ptr, jnp.zeros_like(ptr)))
  return queue, (ptr + batch) % queue_size


def shuffle_order(rng: jax.Array, batch_size: int) -> jax.Array:
  """Shuffle BN's grouping: int [B], example i's place in a random order.

  BatchNorm then forms its groups of ``bn_group_size`` from runs of this
  order: the groups MoCo gets by shuffling the key batch across GPUs (one
  permutation shared by every device), here without moving any image; only
  per-group statistics cross devices. ``order = argsort(perm)``, so example
  ``perm[j]`` sits at place j, as in MoCo's ``x[perm]``.
  """
  return jnp.argsort(jax.random.permutation(rng, batch_size)).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class MoCoV2:
  """MoCo v2's decisions, with EqCo as an option.

  Attributes:
    temperature: tau.
    alpha: EqCo's fixed alpha; None = plain InfoNCE.
    queue_size: Q, the queue's length.
    num_negatives: K of the Q queue entries per query (one random subset per
      step, shared by all queries); None = the whole queue.
    shuffle_bn: Shuffle BN on the key encoder.
  """
  temperature: float
  alpha: float | None
  queue_size: int
  num_negatives: int | None = None
  shuffle_bn: bool = True
  symmetric: bool = dataclasses.field(default=False, init=False)

  def init_queue(self, rng: jax.Array, embed_dim: int
                 ) -> tuple[jax.Array, jax.Array]:
    return (init_queue(rng, self.queue_size, embed_dim),
            jnp.zeros((), jnp.int32))

  def key_embeddings(self, key_forward: KeyForward, images: jax.Array,
                     rng: jax.Array) -> tuple[jax.Array, object]:
    if self.shuffle_bn:
      return key_forward(images,
                         bn_order=shuffle_order(rng, images.shape[0]))
    return key_forward(images)

  def negatives(self, queue: jax.Array, rng: jax.Array) -> jax.Array:
    """The ``[K, D]`` queue entries every query sees this step."""
    if self.num_negatives is None or self.num_negatives >= queue.shape[0]:
      return queue
    return queue[jax.random.permutation(rng, queue.shape[0])
                 [:self.num_negatives]]

  def loss(self, query: jax.Array, key: jax.Array, queue: jax.Array,
           rng: jax.Array) -> tuple[jax.Array, Metrics]:
    """:func:`losses.eqco_infonce` against K queue entries."""
    negatives = self.negatives(queue, rng)
    loss = losses.eqco_infonce(query, key, negatives,
                               temperature=self.temperature, alpha=self.alpha)
    positive, negative = losses.infonce_logits(
        query, key, negatives, temperature=self.temperature)
    return loss, losses.candidate_accuracies(positive, negative)

  def update_queue(self, queue: jax.Array, pointer: jax.Array,
                   keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    return enqueue(queue, pointer, keys)
