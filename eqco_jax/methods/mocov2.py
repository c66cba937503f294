"""MoCo v2: negatives from a FIFO queue of past keys; Shuffle BN on the keys."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from eqco_jax import losses


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


def shuffled_forward(
    forward: Callable[[jax.Array], tuple[jax.Array, ...]],
    images: jax.Array, rng: jax.Array,
) -> tuple[jax.Array, ...]:
  """Shuffle BN: runs ``forward`` on a permuted batch, un-permutes the rows.

  ``forward`` computes BN statistics per group of consecutive examples (the
  encoder's ``bn_group_size``), so each group sees a random subset of the
  batch, as each GPU does after MoCo's cross-GPU shuffle. One permutation is
  shared by every device. ``forward`` returns ``(embeddings [B, D], *rest)``;
  only the embeddings are un-permuted.
  """
  perm = jax.random.permutation(rng, images.shape[0])
  embeddings, *rest = forward(images[perm])
  inverse = jnp.argsort(perm)
  return (embeddings[inverse], *rest)


def mocov2_loss(
    query: jax.Array, key: jax.Array, queue: jax.Array, *,
    temperature: float, alpha: float | None,
    num_negatives: int | None = None, rng: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """EqCo loss with queue entries as shared negatives.

  Args:
    query: ``[B, D]`` L2-normalised queries (online encoder).
    key: ``[B, D]`` L2-normalised positives (momentum encoder), no gradient.
    queue: ``[Q, D]`` past keys.
    temperature, alpha: as in :func:`losses.eqco_infonce`.
    num_negatives: K, how many queue entries each query sees; None = all Q.
      A smaller K takes one random subset of the queue, shared by all queries.
    rng: picks that subset.

  Returns:
    ``(scalar loss, {"top1", "top5"})`` of the positive among positive + K.
  """
  if num_negatives is not None and num_negatives < queue.shape[0]:
    rows = jax.random.permutation(rng, queue.shape[0])[:num_negatives]
    queue = queue[rows]
  positive, negatives = losses.infonce_logits(
      query, key, queue, temperature=temperature)
  loss = losses.eqco_from_logits(positive, negatives, alpha=alpha)
  return loss, losses.candidate_accuracies(positive, negatives)
