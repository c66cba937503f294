"""The EqCo / InfoNCE family of contrastive losses, as pure functions of arrays.

EqCo (Zhu et al., 2020) scales the negatives' term of InfoNCE by ``alpha / K``::

    L = -s0 + log(exp(s0) + (alpha / K) * sum_i exp(s_i)),   s = q . k / temperature

so that the loss and its gradient depend on the fixed ``alpha`` rather than on
the number ``K`` of negatives a query really sees. ``alpha=None`` (or
``alpha == K``) is plain InfoNCE. Everything is computed as a log-sum-exp in
float32 with the shift ``log(alpha / K)`` added to the negative logits, so raw
logits are never exponentiated.

No Flax and no config here: the functions work under ``jit``, ``grad``,
``vmap``, ``shard_map`` and ``pmap``. Inputs are embeddings the caller has
already L2-normalised (see :func:`l2_normalize`).
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

Reduction = Literal["mean", "sum", "none"]
_REDUCTIONS = ("mean", "sum", "none")
_HIGHEST = jax.lax.Precision.HIGHEST


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """Returns ``x / max(||x||, eps)`` along ``axis``, computed in float32."""
  x = jnp.asarray(x, jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def _check_temperature(temperature: float) -> None:
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(
        f"temperature must be > 0, got {temperature}; the paper uses 0.2.")


def _check_alpha(alpha: float | None) -> None:
  if alpha is not None and isinstance(alpha, (int, float)) and not alpha > 0:
    raise ValueError(
        f"alpha must be > 0 or None (plain InfoNCE), got {alpha}; "
        "the paper uses 65536.")


def _check_reduction(reduction: str) -> None:
  if reduction not in _REDUCTIONS:
    raise ValueError(
        f"reduction must be one of {_REDUCTIONS}, got {reduction!r}.")


def negative_logit_shift(alpha: float | None, num_negatives: int) -> float:
  """The constant ``log(alpha / K)`` EqCo adds to every negative logit."""
  _check_alpha(alpha)
  if alpha is None:
    return 0.0
  return math.log(alpha) - math.log(num_negatives)


def _reduce(per_example: jax.Array, reduction: Reduction) -> jax.Array:
  if reduction == "mean":
    return jnp.mean(per_example)
  if reduction == "sum":
    return jnp.sum(per_example)
  return per_example


def eqco_from_logits(
    positive_logits: jax.Array,
    negative_logits: jax.Array,
    *,
    alpha: float | None = None,
    num_negatives: int | None = None,
    reduction: Reduction = "mean",
) -> jax.Array:
  """EqCo loss from similarity logits (already divided by the temperature).

  Args:
    positive_logits: ``[N]`` logit of each query's positive.
    negative_logits: ``[N, M]`` logits of the candidate negatives. Entries equal
      to ``-inf`` are masked out (not negatives of that query).
    alpha: the fixed "equivalent" number of negatives; ``None`` = InfoNCE.
    num_negatives: K, the number of unmasked negatives per query (default M).
    reduction: ``"mean"`` / ``"sum"`` over queries, or ``"none"`` for ``[N]``.

  Returns:
    The loss: a scalar, or ``[N]`` with ``reduction="none"``.
  """
  _check_reduction(reduction)
  if positive_logits.ndim != 1 or negative_logits.ndim != 2 or (
      negative_logits.shape[0] != positive_logits.shape[0]):
    raise ValueError(
        "positive_logits must be [N] and negative_logits [N, M], got "
        f"{positive_logits.shape} and {negative_logits.shape}.")
  k = negative_logits.shape[1] if num_negatives is None else num_negatives
  shift = negative_logit_shift(alpha, k)
  positive_logits = positive_logits.astype(jnp.float32)
  logits = jnp.concatenate(
      [positive_logits[:, None], negative_logits.astype(jnp.float32) + shift],
      axis=1)
  per_example = jax.nn.logsumexp(logits, axis=1) - positive_logits
  return _reduce(per_example, reduction)


def positive_rank_accuracy(
    positive_logits: jax.Array, negative_logits: jax.Array, top_k: int = 1
) -> jax.Array:
  """``[N]`` float: 1 where the positive is among the top ``top_k`` candidates.

  Ties are resolved in favour of the positive; ``-inf`` negatives never count.
  """
  num_above = jnp.sum(negative_logits > positive_logits[:, None], axis=1)
  return (num_above < top_k).astype(jnp.float32)


def candidate_accuracies(positive_logits: jax.Array,
                         negative_logits: jax.Array) -> dict[str, jax.Array]:
  """``{"top1", "top5"}``: mean rate of the positive among its candidates."""
  return {f"top{k}": positive_rank_accuracy(
      positive_logits, negative_logits, k).mean() for k in (1, 5)}


def _similarity(a: jax.Array, b: jax.Array, temperature: float) -> jax.Array:
  """``[N, M]`` = a @ b.T / temperature in float32 at full matmul precision."""
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  return jnp.matmul(a, b.T, precision=_HIGHEST) / temperature


def _check_rank2_pair(query: jax.Array, other: jax.Array, other_name: str):
  if query.ndim != 2 or other.shape != query.shape:
    raise ValueError(
        f"query and {other_name} must both be [N, D] with the same shape, got "
        f"{query.shape} and {other.shape}.")


def infonce_logits(
    query: jax.Array,
    positive: jax.Array,
    negatives: jax.Array,
    *,
    temperature: float,
) -> tuple[jax.Array, jax.Array]:
  """Logits of each query's positive ``[N]`` and of its negatives ``[N, K]``.

  ``negatives`` is ``[K, D]`` (shared, e.g. MoCo's queue) or ``[N, K, D]``.
  """
  _check_temperature(temperature)
  _check_rank2_pair(query, positive, "positive")
  n, d = query.shape
  if negatives.ndim == 2 and negatives.shape[1] == d:
    negative_logits = _similarity(query, negatives, temperature)
  elif negatives.ndim == 3 and negatives.shape[0] == n and negatives.shape[2] == d:
    negative_logits = jnp.einsum(
        "nd,nkd->nk", query.astype(jnp.float32),
        negatives.astype(jnp.float32), precision=_HIGHEST) / temperature
  else:
    raise ValueError(
        f"negatives must be [K, {d}] or [{n}, K, {d}] to match query {query.shape}, "
        f"got {negatives.shape}.")
  if negative_logits.shape[1] < 1:
    raise ValueError("negatives must hold at least one negative (K >= 1).")
  positive_logits = jnp.sum(
      query.astype(jnp.float32) * positive.astype(jnp.float32), axis=1
  ) / temperature
  return positive_logits, negative_logits


def eqco_infonce(
    query: jax.Array,
    positive: jax.Array,
    negatives: jax.Array,
    *,
    temperature: float,
    alpha: float | None = None,
    reduction: Reduction = "mean",
) -> jax.Array:
  """EqCo (or, with ``alpha=None``, InfoNCE) with explicit negatives.

  Args:
    query: ``[N, D]`` L2-normalised queries.
    positive: ``[N, D]`` L2-normalised positive keys, row i for query i.
    negatives: ``[K, D]`` negatives shared by all queries (e.g. MoCo's queue)
      or ``[N, K, D]`` negatives per query.
    temperature: tau > 0.
    alpha: fixed equivalent number of negatives; ``None`` = InfoNCE (alpha=K).
    reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[N]``).

  Returns:
    Scalar loss, or ``[N]`` with ``reduction="none"``. float32.
  """
  _check_alpha(alpha)
  _check_reduction(reduction)
  positive_logits, negative_logits = infonce_logits(
      query, positive, negatives, temperature=temperature)
  return eqco_from_logits(
      positive_logits, negative_logits, alpha=alpha, reduction=reduction)


def in_batch_logits(
    query: jax.Array,
    key: jax.Array,
    *,
    temperature: float,
    num_negatives: int | None = None,
    rng: jax.Array | None = None,
    axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array, int]:
  """SiMo's logits: each query against its own key and the batch's other keys.

  Row i's positive is key i. Its negatives are all other keys of the global
  batch (K = B - 1) or, with ``num_negatives=K``, K of those columns picked by
  one random permutation of the batch drawn from ``rng``: the first K entries
  of the permutation that are not i. The permutation is the same for every
  query and every device.

  Args:
    query: ``[b, D]`` queries (global batch, or local rows with ``axis_name``).
    key: ``[b, D]`` keys, row i the positive of query i.
    temperature: tau > 0.
    num_negatives: K in 1..B-1, or None for all B-1 other keys.
    rng: PRNG key choosing the negatives; needed when K < B - 1.
    axis_name: when set, the function runs inside ``shard_map``/``pmap`` on
      local rows and gathers the keys of the whole batch over this axis.

  Returns:
    ``(positive_logits [b], negative_logits [b, K+1 or B], K)``: negatives'
    logits with exactly K finite entries per row (the rest ``-inf``).
  """
  _check_temperature(temperature)
  _check_rank2_pair(query, key, "key")
  local_size = query.shape[0]
  if axis_name is None:
    all_keys, first_row = key, 0
  else:
    all_keys = jax.lax.all_gather(key, axis_name, axis=0, tiled=True)
    first_row = jax.lax.axis_index(axis_name) * local_size
  global_size = all_keys.shape[0]
  if global_size < 2:
    raise ValueError(
        "in-batch negatives need a global batch of at least 2 examples, got "
        f"{global_size}.")
  if num_negatives is None or num_negatives == global_size - 1:
    k = global_size - 1
    candidates = jnp.arange(global_size)
  else:
    if not 1 <= num_negatives <= global_size - 1:
      raise ValueError(
          f"num_negatives must be in 1..{global_size - 1} (the global batch "
          f"minus one), got {num_negatives}.")
    if rng is None:
      raise ValueError(
          "num_negatives < batch_size - 1 needs an rng to choose the negatives.")
    k = num_negatives
    candidates = jax.random.permutation(rng, global_size)[: k + 1]
  row_ids = first_row + jnp.arange(local_size)
  is_self = candidates[None, :] == row_ids[:, None]
  # Rows whose own key is not among the K + 1 candidates drop the last one.
  drop_last = ~jnp.any(is_self, axis=1, keepdims=True) & (
      jnp.arange(candidates.shape[0]) == candidates.shape[0] - 1)[None, :]
  negative_logits = _similarity(query, all_keys[candidates], temperature)
  negative_logits = jnp.where(is_self | drop_last, -jnp.inf, negative_logits)
  positive_logits = jnp.sum(
      query.astype(jnp.float32) * key.astype(jnp.float32), axis=1) / temperature
  return positive_logits, negative_logits, k


def in_batch_eqco(
    query: jax.Array,
    key: jax.Array,
    *,
    temperature: float,
    alpha: float | None = None,
    num_negatives: int | None = None,
    rng: jax.Array | None = None,
    axis_name: str | None = None,
    reduction: Reduction = "mean",
) -> jax.Array:
  """SiMo's EqCo loss with in-batch negatives (see :func:`in_batch_logits`).

  With ``axis_name`` the result equals the global computation: ``"mean"`` and
  ``"sum"`` reduce over the whole batch; ``"none"`` gives the local ``[b]``.

  Returns:
    Scalar float32 loss, or ``[b]`` with ``reduction="none"``.
  """
  _check_alpha(alpha)
  _check_reduction(reduction)
  positive_logits, negative_logits, k = in_batch_logits(
      query, key, temperature=temperature, num_negatives=num_negatives,
      rng=rng, axis_name=axis_name)
  per_example = eqco_from_logits(
      positive_logits, negative_logits, alpha=alpha, num_negatives=k,
      reduction="none")
  if axis_name is None or reduction == "none":
    return _reduce(per_example, reduction)
  total = jax.lax.psum(jnp.sum(per_example), axis_name)
  if reduction == "sum":
    return total
  return total / jax.lax.psum(per_example.shape[0], axis_name)
