"""The contrastive encoder: backbone features and an L2-normalised embedding."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from eqco_jax.core.losses import l2_normalize
from eqco_jax.core.models.heads import create_head
from eqco_jax.core.models.resnet import create_backbone
from eqco_jax.core.types import Dtype

class Encoder(nn.Module):
  """Backbone + projection head.

  The variables nest as ``{'params': {'backbone': ..., 'head': ...},
  'batch_stats': {'backbone': ..., 'head': ...}}``, so the backbone alone can
  be applied with the ``'backbone'`` sub-trees (linear evaluation).

  Attributes:
    backbone: maps images [N, H, W, 3] to features [N, C] (``train`` arg).
    head: maps features [N, C] to embeddings [N, D] (``train`` arg).
  """
  backbone: nn.Module
  head: nn.Module

  def __call__(self, x: jax.Array, train: bool,
               bn_order: jax.Array | None = None) -> dict[str, jax.Array]:
    """Returns features [N, C] and unit-norm embedding [N, D], both float32.

    ``bn_order``: int [N], a permutation; BatchNorm groups are runs of
    ``bn_group_size`` in that order (Shuffle BN). None: consecutive runs.
    """
    features = self.backbone(x, train=train, bn_order=bn_order).astype(
        jnp.float32)
    embedding = l2_normalize(self.head(features, train=train,
                                       bn_order=bn_order))
    return dict(features=features, embedding=embedding)


def create_encoder(model: str, head: str, *, width: int = 64,
                   small_image_stem: bool = False, head_hidden_dim: int = 2048,
                   head_out_dim: int = 128, bn_group_size: int | None = None,
                   zero_init_residual: bool = True,
                   dtype: Dtype = jnp.float32, remat: bool = False) -> Encoder:
  """Returns the encoder ``model`` (a key of LAYOUTS) + ``head`` (of HEADS).

  ``bn_group_size`` applies to every BatchNorm of the backbone and the head.
  """
  backbone = create_backbone(model, width=width,
                             small_image_stem=small_image_stem,
                             bn_group_size=bn_group_size,
                             zero_init_residual=zero_init_residual, dtype=dtype,
                             remat=remat)
  projection = create_head(head, hidden_dim=head_hidden_dim,
                           out_dim=head_out_dim, bn_group_size=bn_group_size,
                           dtype=dtype)
  return Encoder(backbone=backbone, head=projection)
