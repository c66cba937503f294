"""The frozen backbone and feature extraction.

The backbone enters as ``apply_backbone(variables, images) -> features``
with the variables passed explicitly (never closed over), so that jit takes
them as arguments: closed-over arrays would be baked into the compiled
program as constants (100 MB for a ResNet-50) and cannot be sharded.
:func:`backbone_apply_fn` and :func:`backbone_variables` build both from
the models of :mod:`eqco_jax.core.models` and a pretraining state.

Evaluation batches are dicts ``{'image': uint8 [B, H, W, 3], 'label': int32
[B], 'mask': bool [B]}``; rows with ``mask`` False are padding and never
count. :func:`extract_features` brings the features to the host;
:func:`extract_sharded_features` keeps them sharded over the mesh (the kNN
memory bank of :func:`eqco_jax.core.evaluate.knn.knn_predict_sharded`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from eqco_jax.core import sharding as sharding_lib
from eqco_jax.core.types import PyTree

Batch = dict[str, jax.Array]
# apply_backbone(variables, images float32 [N, H, W, 3]) -> features [N, C].
ApplyBackbone = Callable[[PyTree, jax.Array], jax.Array]
# normalize(images uint8 [N, H, W, 3]) -> float32 [N, H, W, 3].
Normalize = Callable[[jax.Array], jax.Array]
# Batches stacked at a time by extract_sharded_features: one concatenation of
# many operands compiles slowly (~1 min for 5000), groups of 64 do not.
STACK_GROUP = 64


def backbone_apply_fn(backbone: nn.Module) -> ApplyBackbone:
  """``(variables, images) -> backbone.apply(variables, images, train=False)``.

  Inference mode: BatchNorm uses its running statistics and nothing is
  mutated. Build it once and reuse it: the jitted forwards of this package
  are cached on the identity of ``apply_backbone`` and ``normalize``.
  """

  def apply_backbone(variables: PyTree, images: jax.Array) -> jax.Array:
    return backbone.apply(variables, images, train=False)

  return apply_backbone


def backbone_variables(params: PyTree, batch_stats: PyTree) -> PyTree:
  """The backbone's variables of a pretraining encoder (backbone + head)."""
  return {"params": params["backbone"],
          "batch_stats": batch_stats.get("backbone", {})}


def gather_to_host(x: jax.Array) -> np.ndarray:
  """The whole (global) array on the host, on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


@functools.lru_cache(maxsize=16)
def _jitted_features(apply_backbone: ApplyBackbone, normalize: Normalize):
  """A jitted ``(variables, images uint8) -> features float32``."""
  return jax.jit(lambda variables, images: apply_backbone(
      variables, normalize(images)).astype(jnp.float32))


def extract_features(
    apply_backbone: ApplyBackbone,
    variables: PyTree,
    batches: Iterable[Batch],
    normalize: Normalize,
) -> tuple[np.ndarray, np.ndarray]:
  """Features and labels of every real (``mask`` True) example, in order.

  Args:
    apply_backbone: ``(variables, images float32 [B, H, W, 3]) -> [B, C]``,
      the frozen backbone in inference mode (see :func:`backbone_apply_fn`).
    variables: the backbone's variables (e.g. replicated on the mesh).
    batches: dicts with ``image`` uint8 ``[B, H, W, 3]``, ``label`` int
      ``[B]`` and optionally ``mask`` bool ``[B]`` (padding rows False).
    normalize: uint8 images -> float32 network inputs.

  Returns:
    ``(features float32 [M, C], labels int32 [M])`` on the host, M the number
    of real examples (padded rows dropped, no duplicates).
  """
  forward = _jitted_features(apply_backbone, normalize)
  features, labels = [], []

  def fetch(pending):
    out, batch = pending
    keep = (gather_to_host(batch["mask"]).astype(bool) if "mask" in batch
            else slice(None))
    features.append(gather_to_host(out)[keep])
    labels.append(gather_to_host(batch["label"])[keep])

  pending = None
  for batch in batches:
    out = forward(variables, batch["image"])  # Dispatched asynchronously...
    if pending is not None:
      fetch(pending)  # ...while the previous batch comes to the host.
    pending = (out, batch)
  if pending is None:
    raise ValueError("extract_features got no batches; the split is empty.")
  fetch(pending)
  return (np.concatenate(features).astype(np.float32),
          np.concatenate(labels).astype(np.int32))


@functools.lru_cache(maxsize=16)
def _jitted_bank_rows(apply_backbone: ApplyBackbone, normalize: Normalize,
                      mesh: Mesh):
  """A jitted ``(variables, images, labels, mask | None) -> (features float32
  [B, C], labels int32 [B])``, sharded on ``data``; padding labels -1."""

  def forward(variables, images, labels, mask):
    features = apply_backbone(variables, normalize(images))
    labels = labels.astype(jnp.int32)
    if mask is not None:
      labels = jnp.where(mask, labels, -1)
    return features.astype(jnp.float32), labels

  rows = sharding_lib.batch_sharding(mesh)
  return jax.jit(forward, out_shardings=(rows, rows))


@functools.lru_cache(maxsize=16)
def _jitted_join(mesh: Mesh, stack: bool):
  """A jitted stack (or concatenation) of ``[(features, labels), ...]`` parts
  along a new (or their) leading axis, the result sharded on axis 1."""
  join = jnp.stack if stack else jnp.concatenate
  return jax.jit(lambda parts: jax.tree.map(lambda *x: join(x), *parts),
                 out_shardings=NamedSharding(
                     mesh, PartitionSpec(None, sharding_lib.DATA_AXIS)))


def extract_sharded_features(
    apply_backbone: ApplyBackbone,
    variables: PyTree,
    batches: Iterable[Batch],
    normalize: Normalize,
) -> tuple[jax.Array, jax.Array]:
  """Features and labels of every batch, left sharded where they were computed.

  Nothing comes to the host and no device ever holds more than its own rows
  of every batch, so the bank may be far larger than one device's memory
  (peak: twice a device's share, while the groups are joined).

  Args:
    apply_backbone, variables, normalize: as for :func:`extract_features`.
    batches: dicts with ``image`` uint8 ``[B, H, W, 3]``, ``label`` int
      ``[B]`` and optionally ``mask`` bool ``[B]`` (padding rows False),
      global arrays sharded with
      ``eqco_jax.core.sharding.batch_sharding(mesh)``.

  Returns:
    ``(features float32 [num_batches, B, C], labels int32 [num_batches, B])``,
    global arrays sharded on axis 1 over the mesh's ``data`` axis exactly as
    the batches were; padding rows have label -1.
  """
  groups, group, previous, mesh = [], [], None, None
  for batch in batches:
    if mesh is None:
      if not isinstance(batch["image"].sharding, NamedSharding):
        raise ValueError(
            "extract_sharded_features needs batches sharded with "
            "eqco_jax.core.sharding.batch_sharding(mesh), got "
            f"{batch['image'].sharding}.")
      mesh = batch["image"].sharding.mesh
      forward = _jitted_bank_rows(apply_backbone, normalize, mesh)
    rows = forward(variables, batch["image"], batch["label"],
                   batch.get("mask"))
    if previous is not None:
      jax.block_until_ready(previous)  # At most two batches in flight.
    group.append(rows)
    previous = rows
    if len(group) == STACK_GROUP:
      groups.append(_jitted_join(mesh, True)(group))
      group = []
  if mesh is None:
    raise ValueError(
        "extract_sharded_features got no batches; the split is empty.")
  if group:
    groups.append(_jitted_join(mesh, True)(group))
  return groups[0] if len(groups) == 1 else _jitted_join(mesh, False)(groups)
