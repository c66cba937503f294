"""The linear evaluation trained image by image through the frozen backbone.

For augmented training (ImageNet): every step runs the frozen backbone
(inference mode, variables under ``stop_gradient``) on a batch of augmented
images and updates only the ``LinearClassifier``, with the schedule and
optimizer of :mod:`eqco_jax.core.evaluate.linear_eval_features`. Batches are
dicts ``{'image': uint8 [B, H, W, 3], 'label': int [B], 'mask': bool [B]}``
(``mask`` optional; rows with ``mask`` False are padding and never count).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from eqco_jax.core import sharding
from eqco_jax.core.evaluate.features import (ApplyBackbone, Batch, Normalize,
                                             gather_to_host)
from eqco_jax.core.evaluate.linear_eval_features import classifier_update
from eqco_jax.core.evaluate.linear_eval_features import masked_mean
from eqco_jax.core.evaluate.linear_eval_features import topk_accuracy
from eqco_jax.core.models import LinearClassifier
from eqco_jax.core.types import Metrics
from eqco_jax.core.types import PyTree



class LinearEvalState(struct.PyTreeNode):
  """What changes during image-level linear evaluation.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: the ``LinearClassifier``'s params (``{'fc': {kernel, bias}}``).
    opt_state: optax state of ``params``.
  """
  step: jax.Array
  params: PyTree
  opt_state: optax.OptState


LinearTrainStep = Callable[[LinearEvalState, Batch, PyTree],
                           tuple[LinearEvalState, Metrics]]


def create_linear_eval_state(
    rng: jax.Array,
    num_features: int,
    num_classes: int,
    tx: optax.GradientTransformation,
) -> LinearEvalState:
  """A fresh classifier ``[num_features] -> [num_classes]`` and its state."""
  params = LinearClassifier(num_classes).init(
      rng, jnp.zeros((1, num_features), jnp.float32))["params"]
  return LinearEvalState(step=jnp.zeros((), jnp.int32), params=params,
                         opt_state=tx.init(params))


def _mask_of(batch: Batch) -> jax.Array:
  """The batch's ``mask [B]``, all True when it has none."""
  if "mask" in batch:
    return batch["mask"]
  return jnp.ones(batch["label"].shape, bool)


def make_linear_train_step(
    apply_backbone: ApplyBackbone,
    tx: optax.GradientTransformation,
    num_classes: int,
    normalize: Normalize,
    schedule: optax.Schedule | None = None,
) -> LinearTrainStep:
  """Builds the pure step ``(state, batch, backbone_vars) -> (state, metrics)``.

  The backbone runs with its variables frozen under ``stop_gradient`` (use an
  inference-mode ``apply_backbone``, e.g.
  :func:`eqco_jax.core.evaluate.features.backbone_apply_fn`); only the
  classifier is updated. ``batch`` holds already augmented uint8 ``image``
  ``[B, H, W, 3]``, ``label`` ``[B]`` and optionally ``mask`` ``[B]``.
  Metrics (over real rows): ``loss``, ``top1``, ``top5`` (k = min(5,
  classes)) and, with ``schedule``, ``learning_rate``.
  """
  classifier = LinearClassifier(num_classes)

  def linear_train_step(state: LinearEvalState, batch: Batch,
                        backbone_vars: PyTree
                        ) -> tuple[LinearEvalState, Metrics]:
    backbone_vars = jax.lax.stop_gradient(backbone_vars)
    features = jax.lax.stop_gradient(
        apply_backbone(backbone_vars, normalize(batch["image"]))
    ).astype(jnp.float32)
    mask = _mask_of(batch)
    labels = batch["label"].astype(jnp.int32)
    params, opt_state, loss, logits = classifier_update(
        classifier, tx, state.params, state.opt_state, features, labels, mask)
    metrics = {
        "loss": loss,
        "top1": masked_mean(topk_accuracy(logits, labels, 1), mask),
        "top5": masked_mean(topk_accuracy(logits, labels, 5), mask),
    }
    if schedule is not None:
      metrics["learning_rate"] = schedule(state.step)
    return state.replace(step=state.step + 1, params=params,
                         opt_state=opt_state), metrics

  return linear_train_step


def jit_linear_train_step(linear_train_step: LinearTrainStep,
                          mesh: Mesh) -> LinearTrainStep:
  """``jax.jit`` over the mesh: batch on ``data``, state (donated), backbone
  variables and metrics replicated."""
  replicated = sharding.replicated(mesh)
  return jax.jit(
      linear_train_step,
      in_shardings=(replicated, sharding.batch_sharding(mesh), replicated),
      out_shardings=(replicated, replicated),
      donate_argnums=0)


@functools.lru_cache(maxsize=16)
def _jitted_classifier_counts(apply_backbone: ApplyBackbone,
                              normalize: Normalize, num_classes: int):
  """A jitted ``(vars, params, batch) -> (top1 hits, top5 hits, count)``."""
  classifier = LinearClassifier(num_classes)

  def counts(backbone_vars, params, images, labels, mask):
    features = apply_backbone(backbone_vars, normalize(images))
    logits = classifier.apply({"params": params},
                              features.astype(jnp.float32))
    mask = mask.astype(jnp.float32)
    labels = labels.astype(jnp.int32)
    return (jnp.sum(topk_accuracy(logits, labels, 1) * mask),
            jnp.sum(topk_accuracy(logits, labels, 5) * mask),
            jnp.sum(mask))

  return jax.jit(counts)


def evaluate_classifier(
    apply_backbone: ApplyBackbone,
    backbone_vars: PyTree,
    classifier_params: PyTree,
    batches: Iterable[Batch],
    normalize: Normalize,
) -> dict[str, float]:
  """Top-1 / top-5 of backbone + classifier over the real rows of ``batches``.

  Args:
    apply_backbone: inference-mode ``(variables, images) -> features``.
    backbone_vars: the frozen backbone's variables.
    classifier_params: ``LinearClassifier`` params (``state.params``).
    batches: dicts ``image`` uint8 ``[B, H, W, 3]``, ``label`` ``[B]``,
      optional ``mask`` ``[B]``; padded rows (mask False) are ignored.
    normalize: uint8 images -> float32 network inputs.

  Returns:
    ``{'top1', 'top5'}`` floats in [0, 1] (top-5: k = min(5, classes)) and
    ``examples``, the number of real rows evaluated.
  """
  num_classes = int(classifier_params["fc"]["bias"].shape[-1])
  counts = _jitted_classifier_counts(apply_backbone, normalize, num_classes)
  totals = None
  for batch in batches:
    batch_counts = counts(backbone_vars, classifier_params, batch["image"],
                          batch["label"], _mask_of(batch))
    totals = batch_counts if totals is None else jax.tree.map(
        jnp.add, totals, batch_counts)
  if totals is None:
    raise ValueError("evaluate_classifier got no batches; the split is empty.")
  top1, top5, count = (float(gather_to_host(x)) for x in totals)
  if count == 0:
    raise ValueError("evaluate_classifier found no real (mask True) example.")
  return {"top1": top1 / count, "top5": top5 / count, "examples": count}
