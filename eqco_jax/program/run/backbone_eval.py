"""The evaluation of a pretraining run's backbone: the kNN monitor during
training and the final kNN and linear evaluation.

The backbone runs frozen (BatchNorm in inference mode) on the un-augmented
evaluation train and test splits of the run's source.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator, TypeVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from eqco_jax.core import device_augment
from eqco_jax.core import models
from eqco_jax.core.evaluate import features as features_lib
from eqco_jax.core.evaluate import knn
from eqco_jax.core.evaluate import linear_eval_features
from eqco_jax.core.types import PyTree
from eqco_jax.data import pipeline
from eqco_jax.data import sources

T = TypeVar("T")
# evaluate(params, batch_stats, *, linear, check=None) -> {'knn_top1',
# 'eval_skipped_records'[, 'linear_top1', 'linear_top5']}.
BackboneEvaluator = Callable[..., dict[str, float]]


def _checked(items: Iterator[T], check: Callable[[], None] | None
             ) -> Iterator[T]:
  """``items``, calling ``check()`` (which may raise) before each."""
  for item in items:
    if check is not None:
      check()
    yield item


def _on_host(x: jax.Array, y: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """The real rows (label >= 0) of sharded ``[n, B, C]`` features."""
  x, y = features_lib.gather_to_host(x), features_lib.gather_to_host(y)
  real = y.reshape(-1) >= 0
  return x.reshape(-1, x.shape[-1])[real], y.reshape(-1)[real]


def make_backbone_evaluator(config: ml_collections.ConfigDict,
                            backbone: models.ResNet, source: sources.Source,
                            mesh: jax.sharding.Mesh) -> BackboneEvaluator:
  """Returns ``evaluate(params, batch_stats, *, linear, check=None) ->
  dict`` for a run.

  kNN top-1 always, against a memory bank that stays sharded over the
  devices (ImageNet's is 10 GB); with ``linear``, also the linear
  evaluation on the same features, brought to the host (small datasets).
  ``eval_skipped_records``: the images of both splits that could not be
  read (left out of the evaluation, see ``data.unreadable``).
  ``check()``, if given, is called before every batch and may raise to stop
  the evaluation. Built once so that its jitted forward is reused.
  """
  info = source.info
  apply_backbone = features_lib.backbone_apply_fn(backbone)
  normalize = functools.partial(device_augment.normalize, mean=info.mean,
                                std=info.std)

  def unreadable(labels: jax.Array, split: str) -> int:
    """The examples of ``split`` missing from ``labels`` (-1: left out)."""
    return pipeline.num_eval_examples(source, split) - int(
        jnp.sum(labels >= 0))

  def features(variables: PyTree, split: str, check: Callable[[], None] | None
               ) -> tuple[jax.Array, jax.Array]:
    batches = _checked(pipeline.eval_batches(
        source, mesh, split=split, augment=False,
        batch_size=config.eval_batch_size), check)
    return features_lib.extract_sharded_features(apply_backbone, variables,
                                                 batches, normalize)

  def evaluate_backbone(params: PyTree, batch_stats: PyTree, *, linear: bool,
                        check: Callable[[], None] | None = None
                        ) -> dict[str, float]:
    variables = features_lib.backbone_variables(params, batch_stats)
    bank = features(variables, "train", check)
    test = features(variables, "test", check)
    results = {"knn_top1": knn.knn_accuracy_sharded(
        *bank, *test, mesh=mesh, num_classes=info.num_classes,
        k=config.knn_k, temperature=config.knn_temperature),
               "eval_skipped_records": (unreadable(bank[1], "train") +
                                        unreadable(test[1], "test"))}
    if linear:
      linear_eval = linear_eval_features.linear_eval_on_features(
          *_on_host(*bank), *_on_host(*test), num_classes=info.num_classes,
          rng=jax.random.key(config.seed), **config.linear_eval.to_dict())
      results.update(linear_top1=linear_eval["top1"],
                     linear_top5=linear_eval["top5"])
    return results

  return evaluate_backbone
