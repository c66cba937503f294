"""The weighted kNN monitor (InstDisc / MoCo).

Cosine similarity of L2-normalised features: the top ``k`` training
neighbours of a test feature vote for their class with weight
``exp(similarity / temperature)``. :func:`knn_predict` takes the memory bank
as one array; :func:`knn_predict_sharded` leaves it sharded over the mesh
(each device ranks its own rows, then the devices' top ``k`` are merged).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from eqco_jax.core.losses import l2_normalize
from eqco_jax.core.sharding import DATA_AXIS

_HIGHEST = jax.lax.Precision.HIGHEST
ArrayLike = jax.Array | np.ndarray


def _vote(top_similarity: jax.Array, top_labels: jax.Array, *,
          num_classes: int, temperature: float) -> jax.Array:
  """The class (int32 ``[]``) with the largest summed ``exp(similarity /
  temperature)`` over the ``[k]`` neighbours; ties: the lowest class. A
  similarity of -inf weighs nothing."""
  weights = jnp.exp(top_similarity / temperature)
  votes = jnp.zeros((num_classes,), jnp.float32).at[top_labels].add(weights)
  return jnp.argmax(votes).astype(jnp.int32)


def _check(bank_shape, test_shape, k, temperature, chunk_size) -> None:
  """Raises ValueError unless the features and the knobs make sense."""
  if bank_shape[-1:] != test_shape[-1:] or not np.prod(bank_shape[:-1]):
    raise ValueError(
        "need train (bank) and test features [..., N, C] and [..., M, C], "
        f"N > 0, got {bank_shape} and {test_shape}.")
  if not (k >= 1 and temperature > 0 and chunk_size >= 1):
    raise ValueError(
        f"need k >= 1, temperature > 0 and chunk_size >= 1, got k={k}, "
        f"temperature={temperature}, chunk_size={chunk_size}.")


@functools.partial(jax.jit,
                   static_argnames=("num_classes", "k", "temperature",
                                    "chunk_size"))
def _knn_predict(train_features, train_labels, test_features, *, num_classes,
                 k, temperature, chunk_size):
  train = l2_normalize(train_features)
  train_labels = train_labels.astype(jnp.int32)

  def predict_row(query: jax.Array) -> jax.Array:
    similarity = jnp.matmul(train, l2_normalize(query), precision=_HIGHEST)
    top_similarity, top_index = jax.lax.top_k(similarity, k)
    return _vote(top_similarity, train_labels[top_index],
                 num_classes=num_classes, temperature=temperature)

  # Rows are vmapped in chunks: one [chunk, N] similarity block at a time.
  return jax.lax.map(predict_row, test_features, batch_size=chunk_size)


def knn_predict(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
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
  if train_features.ndim != 2 or test_features.ndim != 2:
    raise ValueError(
        "train_features and test_features must be [N, C] and [M, C], got "
        f"{train_features.shape} and {test_features.shape}.")
  _check(train_features.shape, test_features.shape, k, temperature,
         chunk_size)
  return _knn_predict(
      train_features, jnp.asarray(train_labels), test_features,
      num_classes=int(num_classes), k=min(int(k), train_features.shape[0]),
      temperature=float(temperature),
      chunk_size=max(1, min(int(chunk_size), test_features.shape[0])))


def knn_accuracy(train_features: ArrayLike, train_labels: ArrayLike,
                 test_features: ArrayLike, test_labels: ArrayLike,
                 **options: Any) -> float:
  """Top-1 accuracy of :func:`knn_predict` on ``test_labels`` ``[M]``;
  ``options`` (``num_classes``, ``k``...) as for :func:`knn_predict`."""
  predictions = knn_predict(train_features, train_labels, test_features,
                            **options)
  return float(np.mean(np.asarray(predictions) == np.asarray(test_labels)))


@functools.partial(jax.jit, static_argnames=(
    "mesh", "num_classes", "k", "temperature", "chunk_size"))
def _knn_predict_sharded(bank_features, bank_labels, test_features, *, mesh,
                         num_classes, k, temperature, chunk_size):
  rows = PartitionSpec(*(None,) * (bank_labels.ndim - 1), DATA_AXIS)
  # Global row numbers: ties go to the lowest row, as in knn_predict.
  index = jnp.arange(bank_labels.size).reshape(bank_labels.shape)
  local_k = min(k, bank_labels.size // mesh.shape[DATA_AXIS])

  def local(features, labels, index, test):
    bank = l2_normalize(features.reshape(-1, features.shape[-1]))
    labels, index = labels.reshape(-1), index.reshape(-1)

    def predict_row(query: jax.Array) -> jax.Array:
      similarity = jnp.matmul(bank, l2_normalize(query), precision=_HIGHEST)
      similarity = jnp.where(labels >= 0, similarity, -jnp.inf)  # Padding.
      top_similarity, top = jax.lax.top_k(similarity, local_k)
      # All devices' candidates [devices * local_k], best then lowest first.
      candidates = jax.lax.all_gather(
          (-top_similarity, index[top], labels[top]), DATA_AXIS, tiled=True)
      negative, _, top_labels = jax.lax.sort(candidates, num_keys=2)
      return _vote(-negative[:k], top_labels[:k], num_classes=num_classes,
                   temperature=temperature)

    return jax.lax.map(predict_row, test, batch_size=chunk_size)

  # Every device votes on the same gathered candidates: the predictions are
  # replicated (all_gather's result counts as varying, hence no check_vma).
  return jax.shard_map(
      local, mesh=mesh, out_specs=PartitionSpec(), check_vma=False,
      in_specs=(PartitionSpec(*rows, None), rows, rows, PartitionSpec()))(
          bank_features, bank_labels, index,
          test_features.reshape(-1, test_features.shape[-1]))


def _global(x: ArrayLike, mesh: Mesh) -> jax.Array:
  """A host array (the same on every process) replicated over ``mesh``."""
  if isinstance(x, jax.Array):
    return x
  x = np.asarray(x)
  return jax.make_array_from_callback(
      x.shape, NamedSharding(mesh, PartitionSpec()), lambda i: x[i])


def knn_predict_sharded(
    bank_features: jax.Array, bank_labels: jax.Array,
    test_features: ArrayLike, *, mesh: Mesh, num_classes: int,
    k: int = 20, temperature: float = 0.07, chunk_size: int = 1024,
) -> jax.Array:
  """:func:`knn_predict` against a bank sharded over ``mesh``, same results.

  Each device keeps the top ``k`` of its own rows; the ``[chunk_size,
  devices * k]`` candidates are all-gathered and the best ``k`` vote.

  Args:
    bank_features: ``[..., B, C]``, axis -2 sharded on the ``data`` axis,
      e.g. ``[num_batches, B, C]`` from ``extract_sharded_features``.
    bank_labels: ``[..., B]`` int, sharded alike; -1: padding, never counts.
    test_features: ``[..., C]`` host or global; every device gets all rows.
    mesh: the mesh with the ``data`` axis; the rest as for ``knn_predict``.

  Returns:
    ``[M]`` int32 predictions of the test rows (leading axes flattened),
    replicated over ``mesh``.
  """
  _check(bank_features.shape, test_features.shape, k, temperature,
         chunk_size)
  num_test = int(np.prod(test_features.shape[:-1]))
  return _knn_predict_sharded(
      bank_features, bank_labels, _global(test_features, mesh), mesh=mesh,
      num_classes=int(num_classes), k=min(int(k), bank_labels.size),
      temperature=float(temperature),
      chunk_size=max(1, min(int(chunk_size), num_test)))


@jax.jit
def _count_correct(predictions: jax.Array, labels: jax.Array) -> jax.Array:
  """``[correct, real]`` int32 over the labels >= 0 (padding: -1)."""
  labels = labels.reshape(-1)
  real = labels >= 0
  return jnp.stack([jnp.sum(real & (predictions == labels)), jnp.sum(real)])


def knn_accuracy_sharded(bank_features: jax.Array, bank_labels: jax.Array,
                         test_features: ArrayLike, test_labels: ArrayLike,
                         **options: Any) -> float:
  """Top-1 accuracy of :func:`knn_predict_sharded` on ``test_labels``
  (``test_features.shape[:-1]``, host or global; -1: padding, not counted);
  ``options`` (``mesh``, ``num_classes``, ``k``...) as for
  :func:`knn_predict_sharded`."""
  predictions = knn_predict_sharded(bank_features, bank_labels, test_features,
                                    **options)
  correct, real = np.asarray(
      _count_correct(predictions, _global(test_labels, options["mesh"])))
  return float(correct / real)
