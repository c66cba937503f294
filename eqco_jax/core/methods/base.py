"""The ``Method`` protocol: the four decisions a contrastive method makes."""

from __future__ import annotations

from typing import Callable, Protocol

import jax

from eqco_jax.core.types import Metrics

# key_forward(images [B, H, W, C], bn_order=None) -> (embeddings [B, D], new
# key BN stats); bn_order (int [B], a permutation) regroups BatchNorm.
KeyForward = Callable[..., tuple[jax.Array, object]]


class Method(Protocol):
  """SiMo and MoCo v2 as the train step sees them.

  Attributes:
    symmetric: both views also serve as queries (the two losses averaged).
  """
  symmetric: bool

  def init_queue(self, rng: jax.Array, embed_dim: int
                 ) -> tuple[jax.Array | None, jax.Array | None]:
    """``(queue [Q, D], pointer int32 [])``, or ``(None, None)``."""

  def key_embeddings(self, key_forward: KeyForward, images: jax.Array,
                     rng: jax.Array) -> tuple[jax.Array, object]:
    """Keys ``[B, D]`` of ``images`` by the key encoder, and its new stats."""

  def loss(self, query: jax.Array, key: jax.Array, queue: jax.Array | None,
           rng: jax.Array) -> tuple[jax.Array, Metrics]:
    """Scalar loss of queries ``[B, D]`` and positives ``[B, D]``, and
    ``{"top1", "top5"}`` of the positive among its candidates."""

  def update_queue(self, queue: jax.Array | None, pointer: jax.Array | None,
                   keys: jax.Array
                   ) -> tuple[jax.Array | None, jax.Array | None]:
    """The queue and pointer after the step's keys ``[B, D]``."""
