"""Evaluation of a pretrained backbone: the kNN monitor and linear evaluation.

Two protocols, both on a frozen backbone (BatchNorm in inference mode, with
its running statistics):

* weighted kNN (InstDisc / MoCo monitor): cosine similarity of L2-normalised
  features, the top ``k`` training neighbours vote for their class with
  weight ``exp(sim / temperature)``;
* linear evaluation (SPEC section 4): one ``LinearClassifier`` (weight
  N(0, 0.01), bias 0) trained with SGD (momentum 0.9, weight decay 0, batch
  256, lr 30, x0.1 at epochs 60 and 80 of 90), reporting top-1 and top-5.
  Either on features extracted once (:func:`linear_eval_on_features`, the
  whole run in one jitted ``scan``), or image by image through the frozen
  backbone (:func:`make_linear_train_step`, :func:`evaluate_classifier`) for
  augmented ImageNet training.

The backbone enters as ``apply_backbone(variables, images) -> features``
with the variables passed explicitly (never closed over), so that jit takes
them as arguments: closed-over arrays would be baked into the compiled
program as constants (100 MB for a ResNet-50) and cannot be sharded.
:func:`backbone_apply_fn` and :func:`backbone_variables` build both from
the models of :mod:`eqco_jax.models` and a pretraining state.

Evaluation batches are dicts ``{'image': uint8 [B, H, W, 3], 'label': int32
[B], 'mask': bool [B]}``; rows with ``mask`` False are padding and never
count. This module does not depend on the input pipeline.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from eqco_jax import sharding
from eqco_jax.models import LinearClassifier

PyTree = Any
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# apply_backbone(variables, images float32 [N, H, W, 3]) -> features [N, C].
ApplyBackbone = Callable[[PyTree, jax.Array], jax.Array]
# normalize(images uint8 [N, H, W, 3]) -> float32 [N, H, W, 3].
Normalize = Callable[[jax.Array], jax.Array]

_HIGHEST = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------ the backbone.


def backbone_apply_fn(backbone: nn.Module) -> ApplyBackbone:
  """``(variables, images) -> backbone.apply(variables, images, train=False)``.

  Inference mode: BatchNorm uses its running statistics and nothing is
  mutated. Build it once and reuse it: the jitted forwards of this module
  are cached on the identity of ``apply_backbone`` and ``normalize``.
  """

  def apply_backbone(variables: PyTree, images: jax.Array) -> jax.Array:
    return backbone.apply(variables, images, train=False)

  return apply_backbone


def backbone_variables(params: PyTree, batch_stats: PyTree) -> PyTree:
  """The backbone's variables of a pretraining encoder (backbone + head)."""
  return {"params": params["backbone"],
          "batch_stats": batch_stats.get("backbone", {})}


def _to_host(x: jax.Array) -> np.ndarray:
  """The whole (global) array on the host, on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


# ---------------------------------------------------------------- accuracy.


def topk_accuracy(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """``[N]`` float32: 1 where ``labels`` is among the ``k`` largest logits.

  Ties are broken towards the lower class index (as ``torch.topk``), so
  constant logits never count as correct for every class. ``k`` is clipped
  to the number of classes.
  """
  k = min(int(k), logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def _topk_k(num_classes: int) -> int:
  return min(5, num_classes)


# -------------------------------------------------------------- features.


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
    keep = (_to_host(batch["mask"]).astype(bool) if "mask" in batch
            else slice(None))
    features.append(_to_host(out)[keep])
    labels.append(_to_host(batch["label"])[keep])

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


# ------------------------------------------------------------------- kNN.


@functools.partial(jax.jit,
                   static_argnames=("num_classes", "k", "temperature",
                                    "chunk_size"))
def _knn_predict(train_features, train_labels, test_features, *, num_classes,
                 k, temperature, chunk_size):
  train = _l2_normalize(train_features)
  train_labels = train_labels.astype(jnp.int32)

  def predict_row(query: jax.Array) -> jax.Array:
    similarity = jnp.matmul(train, _l2_normalize(query), precision=_HIGHEST)
    top_similarity, top_index = jax.lax.top_k(similarity, k)
    weights = jnp.exp(top_similarity / temperature)
    votes = jnp.zeros((num_classes,), jnp.float32).at[
        train_labels[top_index]].add(weights)
    return jnp.argmax(votes).astype(jnp.int32)

  # Rows are vmapped in chunks: one [chunk, N] similarity block at a time.
  return jax.lax.map(predict_row, test_features, batch_size=chunk_size)


def _l2_normalize(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x, jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, 1e-12)


def knn_predict(
    train_features: jax.Array | np.ndarray,
    train_labels: jax.Array | np.ndarray,
    test_features: jax.Array | np.ndarray,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> jax.Array:
  """Weighted kNN class predictions ``[M_test]`` int32.

  Each test feature's ``k`` most cosine-similar training features vote for
  their labels with weight ``exp(similarity / temperature)``; the class with
  the largest summed vote wins (ties: the lowest class index).

  Args:
    train_features: ``[N, C]`` features of the memory bank (any scale).
    train_labels: ``[N]`` int labels in ``[0, num_classes)``.
    test_features: ``[M, C]`` features to classify.
    num_classes: number of classes.
    k: neighbours per test example (clipped to N).
    temperature: the vote weights' temperature.
    chunk_size: test rows per similarity block; memory ~ chunk_size * N.
  """
  train_features = jnp.asarray(train_features)
  test_features = jnp.asarray(test_features)
  if (train_features.ndim != 2 or test_features.ndim != 2
      or train_features.shape[1] != test_features.shape[1]):
    raise ValueError(
        "train_features and test_features must be [N, C] and [M, C], got "
        f"{train_features.shape} and {test_features.shape}.")
  if train_features.shape[0] == 0:
    raise ValueError("knn_predict needs at least one training feature.")
  if not (k >= 1 and temperature > 0 and chunk_size >= 1):
    raise ValueError(
        f"need k >= 1, temperature > 0 and chunk_size >= 1, got k={k}, "
        f"temperature={temperature}, chunk_size={chunk_size}.")
  return _knn_predict(
      train_features, jnp.asarray(train_labels), test_features,
      num_classes=int(num_classes), k=min(int(k), train_features.shape[0]),
      temperature=float(temperature),
      chunk_size=max(1, min(int(chunk_size), test_features.shape[0])))


def knn_accuracy(
    train_features: jax.Array | np.ndarray,
    train_labels: jax.Array | np.ndarray,
    test_features: jax.Array | np.ndarray,
    test_labels: jax.Array | np.ndarray,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> float:
  """Top-1 accuracy of :func:`knn_predict` on ``test_labels`` ``[M]``."""
  predictions = knn_predict(
      train_features, train_labels, test_features, num_classes=num_classes,
      k=k, temperature=temperature, chunk_size=chunk_size)
  return float(np.mean(np.asarray(predictions) == np.asarray(test_labels)))


# ------------------------------------------------- linear evaluation core.


def linear_eval_schedule(
    base_learning_rate: float,
    steps_per_epoch: int,
    decay_epochs: Sequence[int] = (60, 80),
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
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
  """SGD as PyTorch's: ``g + wd * p``, heavy-ball momentum, then ``-lr``."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.sgd(learning_rate, momentum=momentum))


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(jnp.float32)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _classifier_update(
    classifier: nn.Module,
    tx: optax.GradientTransformation,
    params: PyTree,
    opt_state: optax.OptState,
    features: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
) -> tuple[PyTree, optax.OptState, jax.Array, jax.Array]:
  """One SGD step of the classifier on ``features [B, C]``.

  The loss is the cross-entropy averaged over the real (``mask``) rows.

  Returns:
    ``(params, opt_state, loss, logits [B, classes])``.
  """

  def loss_fn(params):
    logits = classifier.apply({"params": params}, features)
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels)
    return _masked_mean(losses, mask), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, logits


# ------------------------------------------- linear eval on fixed features.


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
      params, opt_state, loss, _ = _classifier_update(
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
          jnp.mean(topk_accuracy(logits, labels, _topk_k(num_classes))))


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
    epochs: int = 90,
    batch_size: int = 256,
    learning_rate: float = 30.0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    decay_epochs: Sequence[int] = (60, 80),
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
      the protocol (defaults: SPEC section 4).

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
    epochs: int = 90,
    batch_size: int = 256,
    learning_rate: float = 30.0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    decay_epochs: Sequence[int] = (60, 80),
    standardize: bool = False,
) -> dict[str, float]:
  """Linear evaluation on features extracted once (no augmentation).

  Trains with :func:`train_linear_classifier` (SPEC section 4 by default:
  90 epochs, batch 256, lr 30, momentum 0.9, no weight decay, x0.1 at
  epochs 60 and 80) and measures the classifier on the test features.

  Args:
    train_features: ``[N, C]`` features of the training split.
    train_labels: ``[N]`` int labels in ``[0, num_classes)``.
    test_features: ``[M, C]`` features of the test split.
    test_labels: ``[M]`` int labels.
    num_classes: number of classes.
    rng: PRNG key (classifier init and shuffling).
    epochs, batch_size, learning_rate, momentum, weight_decay, decay_epochs:
      see :func:`train_linear_classifier`.
    standardize: z-score every feature with the training split's mean and
      std first (constant features are only centred). Off in the protocol;
      helps when the backbone's feature scale is far from the usual one.

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
      epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
      momentum=momentum, weight_decay=weight_decay, decay_epochs=decay_epochs)
  top1, top5 = _accuracy_on_features(params, test_features, test_labels,
                                     num_classes=int(num_classes))
  train_top1, _ = _accuracy_on_features(params, train_features, train_labels,
                                        num_classes=int(num_classes))
  return {"top1": float(top1), "top5": float(top5),
          "train_top1": float(train_top1)}


# ------------------------------- linear eval through the frozen backbone.


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
  if "mask" in batch:
    return batch["mask"]
  return jnp.ones(batch["label"].shape, bool)


def make_linear_train_step(
    apply_backbone: ApplyBackbone,
    tx: optax.GradientTransformation,
    num_classes: int,
    normalize: Normalize,
    schedule: optax.Schedule | None = None,
) -> Callable[[LinearEvalState, Batch, PyTree], tuple[LinearEvalState,
                                                      Metrics]]:
  """Builds the pure step ``(state, batch, backbone_vars) -> (state, metrics)``.

  The backbone runs with its variables frozen under ``stop_gradient`` (use an
  inference-mode ``apply_backbone``, e.g. :func:`backbone_apply_fn`); only the
  classifier is updated. ``batch`` holds already augmented uint8 ``image``
  ``[B, H, W, 3]``, ``label`` ``[B]`` and optionally ``mask`` ``[B]``.
  Metrics (over real rows): ``loss``, ``top1``, ``top5`` and, with
  ``schedule``, ``learning_rate``.
  """
  classifier = LinearClassifier(num_classes)
  top5_k = _topk_k(num_classes)

  def linear_train_step(state: LinearEvalState, batch: Batch,
                        backbone_vars: PyTree
                        ) -> tuple[LinearEvalState, Metrics]:
    backbone_vars = jax.lax.stop_gradient(backbone_vars)
    features = jax.lax.stop_gradient(
        apply_backbone(backbone_vars, normalize(batch["image"]))
    ).astype(jnp.float32)
    mask = _mask_of(batch)
    labels = batch["label"].astype(jnp.int32)
    params, opt_state, loss, logits = _classifier_update(
        classifier, tx, state.params, state.opt_state, features, labels, mask)
    metrics = {
        "loss": loss,
        "top1": _masked_mean(topk_accuracy(logits, labels, 1), mask),
        "top5": _masked_mean(topk_accuracy(logits, labels, top5_k), mask),
    }
    if schedule is not None:
      metrics["learning_rate"] = schedule(state.step)
    return state.replace(step=state.step + 1, params=params,
                         opt_state=opt_state), metrics

  return linear_train_step


def jit_linear_train_step(
    linear_train_step: Callable[[LinearEvalState, Batch, PyTree],
                                tuple[LinearEvalState, Metrics]],
    mesh: Mesh,
) -> Callable[[LinearEvalState, Batch, PyTree], tuple[LinearEvalState,
                                                      Metrics]]:
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
            jnp.sum(topk_accuracy(logits, labels, _topk_k(num_classes)) * mask),
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
    ``{'top1', 'top5'}`` floats in [0, 1] (top-5: k = min(5, classes)).
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
  top1, top5, count = (float(_to_host(x)) for x in totals)
  if count == 0:
    raise ValueError("evaluate_classifier found no real (mask True) example.")
  return {"top1": top1 / count, "top5": top5 / count}
