"""eqco_jax.core.losses (public as eqco_jax.losses) against float64
references, analytic gradients and the paper's K property."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from eqco_jax.core import losses
from eqco_jax.core import sharding


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
  x = rng.standard_normal(shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference(q, pos, neg, tau, alpha):
  """float64 EqCo: neg is [N, K, D]."""
  s0 = np.sum(q * pos, -1) / tau
  si = np.einsum("nd,nkd->nk", q, neg) / tau
  k = si.shape[1]
  scale = 1.0 if alpha is None else alpha / k
  m = np.maximum(s0, si.max(1))
  log_z = m + np.log(np.exp(s0 - m) + scale * np.exp(si - m[:, None]).sum(1))
  return log_z - s0


def _in_batch_reference(q, k, tau, alpha, columns_per_row):
  """float64 in-batch EqCo; columns_per_row[i] lists row i's negative columns."""
  neg = np.stack([k[cols] for cols in columns_per_row])
  return _reference(q, k, neg, tau, alpha)


@pytest.mark.parametrize("alpha", [None, 65536.0, 3.0])
@pytest.mark.parametrize("shared", [True, False])
def test_eqco_infonce_matches_float64_reference(alpha, shared):
  rng = np.random.default_rng(0)
  n, k, d, tau = 16, 40, 32, 0.2
  q, pos = _unit(rng, n, d), _unit(rng, n, d)
  neg = _unit(rng, k, d) if shared else _unit(rng, n, k, d)
  neg_per_query = np.broadcast_to(neg, (n, k, d)) if shared else neg
  want = _reference(q, pos, neg_per_query, tau, alpha)
  got = losses.eqco_infonce(
      jnp.asarray(q, jnp.float32), jnp.asarray(pos, jnp.float32),
      jnp.asarray(neg, jnp.float32), temperature=tau, alpha=alpha,
      reduction="none")
  assert got.shape == (n,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
  mean = losses.eqco_infonce(q, pos, neg, temperature=tau, alpha=alpha)
  np.testing.assert_allclose(mean, want.mean(), rtol=2e-6)
  total = losses.eqco_infonce(q, pos, neg, temperature=tau, alpha=alpha,
                              reduction="sum")
  np.testing.assert_allclose(total, want.sum(), rtol=2e-6)


def test_alpha_equal_to_k_is_infonce_and_margin_form_is_identical():
  rng = np.random.default_rng(1)
  n, k, d, tau, alpha = 8, 16, 12, 0.2, 4096.0
  q, pos, neg = _unit(rng, n, d), _unit(rng, n, d), _unit(rng, k, d)
  plain = losses.eqco_infonce(q, pos, neg, temperature=tau, reduction="none")
  same = losses.eqco_infonce(q, pos, neg, temperature=tau, alpha=float(k),
                             reduction="none")
  np.testing.assert_allclose(plain, same, rtol=1e-6)
  # EqCo == InfoNCE after subtracting the margin tau * log(alpha / K) from the
  # positive similarity (docs/method.md, section 1: identical forms).
  margin = tau * math.log(alpha / k)
  eqco = losses.eqco_infonce(q, pos, neg, temperature=tau, alpha=alpha,
                             reduction="none")
  s0 = np.sum(q * pos, 1) / tau
  si = q @ neg.T / tau
  logits = np.concatenate([(s0 - margin / tau)[:, None], si], 1)
  log_z = np.log(np.exp(logits).sum(1))
  margin_form = log_z - (s0 - margin / tau)
  np.testing.assert_allclose(eqco, margin_form, rtol=1e-5)


def test_gradient_matches_analytic_softmax_weights():
  rng = np.random.default_rng(2)
  n, k, alpha = 6, 10, 100.0
  s0 = jnp.asarray(rng.standard_normal(n) * 3, jnp.float32)
  si = jnp.asarray(rng.standard_normal((n, k)) * 3, jnp.float32)
  loss = lambda a, b: losses.eqco_from_logits(a, b, alpha=alpha, reduction="sum")
  g0, gi = jax.grad(loss, argnums=(0, 1))(s0, si)
  s0_, si_ = np.float64(s0), np.float64(si)
  z = np.exp(s0_) + alpha / k * np.exp(si_).sum(1)
  p0 = np.exp(s0_) / z
  pi = alpha / k * np.exp(si_) / z[:, None]
  np.testing.assert_allclose(g0, p0 - 1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gi, pi, rtol=1e-5, atol=1e-7)


def test_finite_at_small_temperature_and_65536_negatives():
  rng = np.random.default_rng(3)
  n, k, d, tau = 8, 65536, 16, 0.005
  q = jnp.asarray(_unit(rng, n, d), jnp.float32)
  neg = jnp.asarray(_unit(rng, k, d), jnp.float32)
  pos = q  # s0 = 200: the largest logit there can be.
  for alpha in (None, 65536.0, 16.0):
    value, grad = jax.value_and_grad(
        lambda q_: losses.eqco_infonce(q_, pos, neg, temperature=tau, alpha=alpha)
    )(q)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
  # Opposite positive: s0 = -200, the loss is large but finite.
  value = losses.eqco_infonce(q, -q, neg, temperature=tau, alpha=65536.0)
  assert np.isfinite(value) and value > 300


def test_bfloat16_inputs_are_computed_in_float32():
  rng = np.random.default_rng(4)
  q, pos, neg = _unit(rng, 8, 32), _unit(rng, 8, 32), _unit(rng, 20, 32)
  as_bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
  got = losses.eqco_infonce(as_bf16(q), as_bf16(pos), as_bf16(neg),
                            temperature=0.2, alpha=65536.0, reduction="none")
  assert got.dtype == jnp.float32
  rounded = [np.asarray(as_bf16(x), np.float64) for x in (q, pos, neg)]
  want = _reference(rounded[0], rounded[1],
                    np.broadcast_to(rounded[2], (8, 20, 32)), 0.2, 65536.0)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_in_batch_all_other_keys_are_negatives():
  rng = np.random.default_rng(5)
  b, d, tau, alpha = 12, 16, 0.2, 65536.0
  q, k = _unit(rng, b, d), _unit(rng, b, d)
  cols = [[j for j in range(b) if j != i] for i in range(b)]
  want = _in_batch_reference(q, k, tau, alpha, cols)
  got = losses.in_batch_eqco(q, k, temperature=tau, alpha=alpha,
                             reduction="none")
  np.testing.assert_allclose(got, want, rtol=2e-6)
  pos, neg, num = losses.in_batch_logits(q, k, temperature=tau)
  assert num == b - 1
  assert np.all(np.isfinite(np.asarray(neg)).sum(1) == b - 1)
  assert np.all(np.isneginf(np.diag(np.asarray(neg))))


def test_in_batch_subset_uses_one_shared_permutation():
  rng = np.random.default_rng(6)
  b, d, tau, alpha, num = 16, 8, 0.2, 256.0, 4
  q, k = _unit(rng, b, d), _unit(rng, b, d)
  key = jax.random.key(7)
  perm = np.asarray(jax.random.permutation(key, b))
  cols = [[j for j in perm if j != i][:num] for i in range(b)]
  want = _in_batch_reference(q, k, tau, alpha, cols)
  got = losses.in_batch_eqco(q, k, temperature=tau, alpha=alpha,
                             num_negatives=num, rng=key, reduction="none")
  np.testing.assert_allclose(got, want, rtol=2e-6)
  _, neg, k_used = losses.in_batch_logits(q, k, temperature=tau,
                                          num_negatives=num, rng=key)
  assert k_used == num
  assert np.all(np.isfinite(np.asarray(neg)).sum(1) == num)
  # A different rng picks different negatives.
  other = losses.in_batch_eqco(q, k, temperature=tau, alpha=alpha,
                               num_negatives=num, rng=jax.random.key(8),
                               reduction="none")
  assert not np.allclose(other, got)


@pytest.mark.parametrize("num_negatives", [None, 5])
def test_in_batch_inside_shard_map_equals_global(num_negatives):
  mesh = sharding.make_mesh()
  assert mesh.devices.size == 8
  rng = np.random.default_rng(9)
  b, d, tau, alpha = 32, 16, 0.2, 65536.0
  q = jnp.asarray(_unit(rng, b, d), jnp.float32)
  k = jnp.asarray(_unit(rng, b, d), jnp.float32)
  key = jax.random.key(3)
  common = dict(temperature=tau, alpha=alpha, num_negatives=num_negatives,
                rng=key)

  def local_loss(q_, k_, reduction):
    return losses.in_batch_eqco(q_, k_, axis_name=sharding.DATA_AXIS,
                                reduction=reduction, **common)

  mean_fn = jax.shard_map(functools.partial(local_loss, reduction="mean"),
                          mesh=mesh, in_specs=(P("data"), P("data")),
                          out_specs=P())
  rows_fn = jax.shard_map(functools.partial(local_loss, reduction="none"),
                          mesh=mesh, in_specs=(P("data"), P("data")),
                          out_specs=P("data"))
  global_rows = losses.in_batch_eqco(q, k, reduction="none", **common)
  np.testing.assert_allclose(jax.jit(rows_fn)(q, k), global_rows, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(mean_fn)(q, k), global_rows.mean(),
                             rtol=1e-6)
  grad_local = jax.jit(jax.grad(mean_fn))(q, k)
  grad_global = jax.grad(
      lambda q_: losses.in_batch_eqco(q_, k, **common))(q)
  np.testing.assert_allclose(grad_local, grad_global, rtol=1e-5, atol=1e-7)


def test_vmap_over_independent_batches():
  rng = np.random.default_rng(10)
  q, k = _unit(rng, 3, 6, 8), _unit(rng, 3, 6, 8)
  batched = jax.vmap(
      lambda a, b: losses.in_batch_eqco(a, b, temperature=0.2, alpha=10.0))(q, k)
  one_by_one = [losses.in_batch_eqco(q[i], k[i], temperature=0.2, alpha=10.0)
                for i in range(3)]
  np.testing.assert_allclose(batched, one_by_one, rtol=1e-6)


def test_positive_rank_accuracy():
  pos = jnp.array([3.0, 0.0, 1.0])
  neg = jnp.array([[1.0, 2.0, -jnp.inf, 0.0, 0.0, 0.0],
                   [1.0, 2.0, 3.0, 4.0, 5.0, 0.0],
                   [2.0, 2.0, 2.0, 2.0, 0.5, 1.0]])
  np.testing.assert_array_equal(losses.positive_rank_accuracy(pos, neg, 1),
                                [1, 0, 0])
  np.testing.assert_array_equal(losses.positive_rank_accuracy(pos, neg, 5),
                                [1, 0, 1])


def test_eqco_keeps_loss_and_gradient_flat_across_k_while_infonce_grows():
  """The paper's property, on random embeddings at tau = 0.2, alpha = 4096."""
  rng = np.random.default_rng(11)
  n, d, tau, alpha = 256, 128, 0.2, 4096.0
  q = jnp.asarray(_unit(rng, n, d), jnp.float32)
  pos = losses.l2_normalize(q + 0.5 * jnp.asarray(_unit(rng, n, d)))
  pool = jnp.asarray(_unit(rng, 4096, d), jnp.float32)
  stats = {}
  for k in (16, 64, 256, 1024, 4096):
    for name, a in (("eqco", alpha), ("infonce", None)):
      fn = lambda q_: losses.eqco_infonce(q_, pos, pool[:k], temperature=tau,
                                          alpha=a)
      value, grad = jax.value_and_grad(fn)(q)
      stats[name, k] = (float(value), float(jnp.linalg.norm(grad)))
  eqco_loss = [stats["eqco", k][0] for k in (16, 64, 256, 1024, 4096)]
  eqco_grad = [stats["eqco", k][1] for k in (16, 64, 256, 1024, 4096)]
  assert max(eqco_loss) - min(eqco_loss) < 0.05 * np.mean(eqco_loss)
  assert max(eqco_grad) / min(eqco_grad) < 1.15
  # InfoNCE's loss keeps growing with K, towards log(4) per fourfold K once the
  # negatives outweigh the positive.
  infonce_loss = [stats["infonce", k][0] for k in (16, 64, 256, 1024, 4096)]
  assert np.all(np.diff(infonce_loss) > 0.35)
  assert infonce_loss[-1] - infonce_loss[-2] > 0.8 * math.log(4)
  assert infonce_loss[-1] - infonce_loss[0] > 3.5
  # ...and its gradient is several times smaller at K = 16 than at K = 4096.
  assert stats["infonce", 4096][1] / stats["infonce", 16][1] > 2


@pytest.mark.parametrize("call, message", [
    (lambda q: losses.eqco_infonce(q, q, q, temperature=0.0), "temperature"),
    (lambda q: losses.eqco_infonce(q, q, q, temperature=-1.0), "temperature"),
    (lambda q: losses.eqco_infonce(q, q, q, temperature=0.2, alpha=0.0),
     "alpha"),
    (lambda q: losses.eqco_infonce(q, q[:3], q, temperature=0.2), "positive"),
    (lambda q: losses.eqco_infonce(q, q, q[:, :2], temperature=0.2),
     "negatives"),
    (lambda q: losses.eqco_infonce(q[0], q[0], q, temperature=0.2), "query"),
    (lambda q: losses.eqco_infonce(q, q, q, temperature=0.2, reduction="max"),
     "reduction"),
    (lambda q: losses.in_batch_eqco(q, q, temperature=0.2, num_negatives=8,
                                    rng=jax.random.key(0)), "num_negatives"),
    (lambda q: losses.in_batch_eqco(q, q, temperature=0.2, num_negatives=0,
                                    rng=jax.random.key(0)), "num_negatives"),
    (lambda q: losses.in_batch_eqco(q, q, temperature=0.2, num_negatives=3),
     "rng"),
    (lambda q: losses.in_batch_eqco(q, q, temperature=0.2, alpha=-2.0),
     "alpha"),
    (lambda q: losses.in_batch_eqco(q[:1], q[:1], temperature=0.2),
     "at least 2"),
])
def test_bad_arguments_raise_one_clear_value_error(call, message):
  q = jnp.ones((8, 4)) / 2.0
  with pytest.raises(ValueError, match=message):
    call(q)
