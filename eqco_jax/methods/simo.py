"""SiMo: MoCo v2 without the queue; negatives are the batch's other keys.

Queries come from the online encoder, keys from the momentum encoder; BN is
synchronised over the global batch; the loss is EqCo with in-batch negatives.
"""

from __future__ import annotations

import jax

from eqco_jax import losses


def simo_loss(
    query: jax.Array, key: jax.Array, *, temperature: float,
    alpha: float | None, num_negatives: int | None, rng: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """EqCo loss of one direction with in-batch negatives.

  Args:
    query: ``[B, D]`` L2-normalised queries (online encoder).
    key: ``[B, D]`` L2-normalised keys (momentum encoder), no gradient.
    temperature, alpha, num_negatives: as in :func:`losses.in_batch_eqco`.
    rng: picks the ``num_negatives`` columns, shared by all queries.

  Returns:
    ``(scalar loss, {"top1", "top5"})``, the accuracies of the positive among
    its candidates (positive + K negatives).
  """
  positive, negatives, k = losses.in_batch_logits(
      query, key, temperature=temperature, num_negatives=num_negatives, rng=rng)
  loss = losses.eqco_from_logits(positive, negatives, alpha=alpha,
                                 num_negatives=k)
  return loss, losses.candidate_accuracies(positive, negatives)
