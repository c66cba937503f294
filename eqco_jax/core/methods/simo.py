"""SiMo: MoCo v2 without the queue; negatives are the batch's other keys.

Queries come from the online encoder, keys from the momentum encoder run with
BN synchronised over the global batch; the loss is EqCo with in-batch
negatives, :func:`eqco_jax.losses.in_batch_eqco`.
"""

from __future__ import annotations

import dataclasses

import jax

from eqco_jax.core import losses
from eqco_jax.core.methods.base import KeyForward, Metrics


@dataclasses.dataclass(frozen=True)
class SiMo:
  """SiMo's decisions.

  Attributes:
    temperature: tau.
    alpha: EqCo's fixed alpha; None = plain InfoNCE.
    num_negatives: K of the B-1 in-batch keys per query; None = all.
    symmetric: both views as queries, the two losses averaged.
  """
  temperature: float
  alpha: float | None
  num_negatives: int | None = None
  symmetric: bool = False

  def init_queue(self, rng: jax.Array, embed_dim: int) -> tuple[None, None]:
    """SiMo keeps no queue."""
    del rng, embed_dim
    return None, None

  def key_embeddings(self, key_forward: KeyForward, images: jax.Array,
                     rng: jax.Array) -> tuple[jax.Array, object]:
    """Keys with BN over the whole global batch: no shuffling."""
    del rng
    return key_forward(images)

  def loss(self, query: jax.Array, key: jax.Array, queue: None,
           rng: jax.Array) -> tuple[jax.Array, Metrics]:
    """:func:`losses.in_batch_eqco` of one direction; ``rng`` picks the K
    negatives shared by all queries."""
    del queue
    options = dict(temperature=self.temperature,
                   num_negatives=self.num_negatives, rng=rng)
    loss = losses.in_batch_eqco(query, key, alpha=self.alpha, **options)
    positive, negatives, _ = losses.in_batch_logits(query, key, **options)
    return loss, losses.candidate_accuracies(positive, negatives)

  def update_queue(self, queue: None, pointer: None, keys: jax.Array
                   ) -> tuple[None, None]:
    del keys
    return queue, pointer
