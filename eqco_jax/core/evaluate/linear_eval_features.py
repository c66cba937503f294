"""The linear evaluation on fixed features (docs/method.md, section 4).

One ``LinearClassifier`` (weight N(0, 0.01), bias 0) trained with SGD and a
step-decayed learning rate on features extracted once from the frozen
backbone, reporting top-1 and top-5: the whole run is one jitted ``scan``.
Every number of the protocol is an argument: the config's ``linear_eval``
fields (``eqco_jax.core.config``) are the one place its values are written.

The building blocks (schedule, optimizer, one classifier step, top-k) are
shared with :mod:`eqco_jax.core.evaluate.linear_eval_images`, which trains
the same classifier image by image through the frozen backbone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from eqco_jax.core.models import LinearClassifier
from eqco_jax.core.types import PyTree


def topk_accuracy(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """``[N]`` float32: 1 where ``labels`` is among the ``k`` largest logits.

  Ties are broken towards the lower class index (as ``torch.topk``), so
  constant logits never count as correct for every class. ``k`` is clipped
  to the number of classes (top-5 of 3 classes is top-3).
  """
  k = min(int(k), logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of ``values [B]`` over the rows where ``mask [B]`` is true."""
  mask = mask.astype(jnp.float32)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def linear_eval_schedule(
    base_learning_rate: float,
    steps_per_epoch: int,
    decay_epochs: Sequence[int],
    decay_factor: float = 0.1,
) -> optax.Schedule:
  """Step decay, optax piecewise constant, per step.

  ``lr(step) = base_lr * decay_factor ** #{e in decay_epochs: step >= e *
  steps_per_epoch}``: as PyTorch's ``MultiStepLR``, the first step of epoch
  ``e`` (0-based) already uses the decayed rate.
  """
  scales: dict[int, float] = {}
  for epoch in decay_epochs:
    boundary = int(epoch) * int(steps_per_epoch)
    scales[boundary] = scales.get(boundary, 1.0) * decay_factor
  return optax.piecewise_constant_schedule(base_learning_rate, scales)


def linear_eval_optimizer(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float,
    weight_decay: float,
) -> optax.GradientTransformation:
  """SGD as PyTorch's: ``g + wd * p``, heavy-ball momentum, then ``-lr``."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.sgd(learning_rate, momentum=momentum))


def classifier_update(
    classifier: nn.Module,
    tx: optax.GradientTransformation,
    params: PyTree,
    opt_state: optax.OptState,
    features: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
) -> tuple[PyTree, optax.OptState, jax.Array, jax.Array]:
  """One optimizer step of the classifier on ``features [B, C]``.

  The loss is the cross-entropy averaged over the real (``mask [B]``) rows
  of ``labels [B]``.

  Returns:
    ``(params, opt_state, loss, logits [B, classes])``.
  """

  def loss_fn(params):
    logits = classifier.apply({"params": params}, features)
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels)
    return masked_mean(losses, mask), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, logits


@functools.partial(jax.jit, static_argnames=(
    "num_classes", "epochs", "batch_size", "decay_epochs"))
def _train_linear_on_features(rng, features, labels, learning_rate, momentum,
                              weight_decay, *, num_classes, epochs,
                              batch_size, decay_epochs):
  """The whole SGD run: scan over epochs of scan over minibatches."""
  n = features.shape[0]
  steps_per_epoch = math.ceil(n / batch_size)
  padded = steps_per_epoch * batch_size
  schedule = linear_eval_schedule(learning_rate, steps_per_epoch,
                                  decay_epochs)
  tx = linear_eval_optimizer(schedule, momentum=momentum,
                             weight_decay=weight_decay)
  classifier = LinearClassifier(num_classes)
  init_rng, shuffle_rng = jax.random.split(rng)
  params = classifier.init(init_rng, features[:1])["params"]
  # Every example once per epoch; the last batch is partial: its missing
  # rows point at example 0 and are masked out of the loss.
  mask = (jnp.arange(padded) < n).reshape(steps_per_epoch, batch_size)

  def train_epoch(carry, epoch_rng):
    order = jax.random.permutation(epoch_rng, n)
    order = jnp.pad(order, (0, padded - n)).reshape(steps_per_epoch,
                                                    batch_size)

    def train_batch(carry, xs):
      params, opt_state = carry
      index, batch_mask = xs
      params, opt_state, loss, _ = classifier_update(
          classifier, tx, params, opt_state, features[index], labels[index],
          batch_mask)
      return (params, opt_state), loss

    carry, losses = jax.lax.scan(train_batch, carry, (order, mask))
    return carry, jnp.mean(losses)

  (params, _), epoch_losses = jax.lax.scan(
      train_epoch, (params, tx.init(params)),
      jax.random.split(shuffle_rng, epochs))
  return params, epoch_losses


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _accuracy_on_features(params, features, labels, *, num_classes):
  """``(top1, top5)`` of the classifier on ``features [N, C]``."""
  logits = LinearClassifier(num_classes).apply({"params": params}, features)
  return (jnp.mean(topk_accuracy(logits, labels, 1)),
          jnp.mean(topk_accuracy(logits, labels, 5)))


def _check_split(name: str, features: np.ndarray, labels: np.ndarray,
                 num_classes: int) -> None:
  if (features.ndim != 2 or labels.shape != features.shape[:1]
      or features.shape[0] == 0):
    raise ValueError(
        f"{name} features and labels must be [N, C] and [N] with N >= 1, got "
        f"{features.shape} and {labels.shape}.")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(
        f"{name} labels must lie in [0, {num_classes}), got "
        f"[{labels.min()}, {labels.max()}].")


def train_linear_classifier(
    features: jax.Array | np.ndarray,
    labels: jax.Array | np.ndarray,
    *,
    num_classes: int,
    rng: jax.Array,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    momentum: float,
    weight_decay: float,
    decay_epochs: Sequence[int],
) -> tuple[PyTree, jax.Array]:
  """Trains a ``LinearClassifier`` on fixed features, all in one jit.

  SGD over shuffled minibatches, every example exactly once per epoch: epoch
  ``e`` visits the examples in the order ``jax.random.permutation(
  jax.random.split(shuffle_rng, epochs)[e], N)``, where ``init_rng,
  shuffle_rng = jax.random.split(rng)``, in batches of ``batch_size`` (capped
  at N); the last batch of an epoch is partial and its loss is the mean over
  its real rows, like PyTorch's ``drop_last=False``. The learning rate is
  ``learning_rate`` (not rescaled with the batch) times 0.1 from each epoch
  of ``decay_epochs``. The float hyper-parameters are traced, so a sweep over
  them compiles once.

  Args:
    features: ``[N, C]`` training features.
    labels: ``[N]`` int labels in ``[0, num_classes)``.
    num_classes: number of classes.
    rng: PRNG key (classifier init and shuffling).
    epochs, batch_size, learning_rate, momentum, weight_decay, decay_epochs:
      the protocol.

  Returns:
    ``(params, epoch_losses [epochs])``: the classifier's params and the
    mean minibatch loss of each epoch.
  """
  features = np.asarray(features, np.float32)
  labels = np.asarray(labels, np.int32)
  _check_split("train", features, labels, num_classes)
  if epochs < 1 or batch_size < 1:
    raise ValueError(
        f"need epochs >= 1 and batch_size >= 1, got {epochs}, {batch_size}.")
  return _train_linear_on_features(
      rng, jnp.asarray(features), jnp.asarray(labels),
      jnp.float32(learning_rate), jnp.float32(momentum),
      jnp.float32(weight_decay), num_classes=int(num_classes),
      epochs=int(epochs), batch_size=int(min(batch_size, features.shape[0])),
      decay_epochs=tuple(int(e) for e in decay_epochs))


def linear_eval_on_features(
    train_features: jax.Array | np.ndarray,
    train_labels: jax.Array | np.ndarray,
    test_features: jax.Array | np.ndarray,
    test_labels: jax.Array | np.ndarray,
    *,
    num_classes: int,
    rng: jax.Array,
    standardize: bool = False,
    **protocol: Any,
) -> dict[str, float]:
  """Linear evaluation on features extracted once (no augmentation).

  Trains with :func:`train_linear_classifier` and measures the classifier on
  the test features.

  Args:
    train_features: ``[N, C]`` features of the training split.
    train_labels: ``[N]`` int labels in ``[0, num_classes)``.
    test_features: ``[M, C]`` features of the test split.
    test_labels: ``[M]`` int labels.
    num_classes: number of classes.
    rng: PRNG key (classifier init and shuffling).
    standardize: z-score every feature with the training split's mean and
      std first (constant features are only centred). Off in the protocol;
      helps when the backbone's feature scale is far from the usual one.
    **protocol: ``epochs``, ``batch_size``, ``learning_rate``,
      ``momentum``, ``weight_decay`` and ``decay_epochs`` of
      :func:`train_linear_classifier` (a config's ``linear_eval``).

  Returns:
    ``{'top1', 'top5', 'train_top1'}`` as floats in [0, 1]; top-5 is top-k
    with k = min(5, num_classes).
  """
  train_features = np.asarray(train_features, np.float32)
  test_features = np.asarray(test_features, np.float32)
  train_labels = np.asarray(train_labels, np.int32)
  test_labels = np.asarray(test_labels, np.int32)
  _check_split("train", train_features, train_labels, num_classes)
  _check_split("test", test_features, test_labels, num_classes)
  if train_features.shape[1] != test_features.shape[1]:
    raise ValueError(
        f"train and test features differ in width: {train_features.shape} "
        f"and {test_features.shape}.")
  if standardize:
    mean = train_features.mean(axis=0)
    std = train_features.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0)
    train_features = (train_features - mean) / std
    test_features = (test_features - mean) / std

  params, _ = train_linear_classifier(
      train_features, train_labels, num_classes=num_classes, rng=rng,
      **protocol)
  top1, top5 = _accuracy_on_features(params, test_features, test_labels,
                                     num_classes=int(num_classes))
  train_top1, _ = _accuracy_on_features(params, train_features, train_labels,
                                        num_classes=int(num_classes))
  return {"top1": float(top1), "top5": float(top5),
          "train_top1": float(train_top1)}
