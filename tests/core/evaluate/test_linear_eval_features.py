"""eqco_jax.core.evaluate.linear_eval_features: top-k and the linear
evaluation on fixed features."""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from eqco_jax.core import config as config_lib
from eqco_jax.core import models
from eqco_jax.core.evaluate import linear_eval_features

# The protocol as a pretraining config sets it (docs/method.md, section 4).
PROTOCOL = {k: v for k, v in config_lib.linear_eval_config().items()
            if k != "standardize"}


def test_topk_accuracy():
  logits = jnp.array([[0.1, 0.5, 0.2, 0.0],
                      [0.9, 0.1, 0.3, 0.2],
                      [0.0, 0.0, 0.0, 0.0]])
  labels = jnp.array([2, 2, 3])
  topk = functools.partial(linear_eval_features.topk_accuracy, logits, labels)
  np.testing.assert_array_equal(topk(1), [0, 0, 0])
  np.testing.assert_array_equal(topk(2), [1, 1, 0])  # Ties: the lower index.
  np.testing.assert_array_equal(topk(9), [1, 1, 1])  # k clipped to classes.


def test_the_protocols_numbers_come_from_the_config_only():
  """No function here holds a default of the protocol: a change to the
  config's ``linear_eval`` cannot be half made."""
  for function in (linear_eval_features.train_linear_classifier,
                   linear_eval_features.linear_eval_optimizer,
                   linear_eval_features.linear_eval_schedule):
    parameters = inspect.signature(function).parameters
    assert all(parameters[name].default is inspect.Parameter.empty
               for name in PROTOCOL if name in parameters), function


def test_linear_eval_on_separable_features():
  rng = np.random.default_rng(3)
  x, y = helpers.clusters(rng, 1500, 32, 10, spread=0.1)
  result = linear_eval_features.linear_eval_on_features(
      x[:1000], y[:1000], x[1000:], y[1000:], num_classes=10,
      rng=jax.random.key(0), **PROTOCOL | dict(epochs=10, decay_epochs=(6, 8)))
  assert set(result) == {"top1", "top5", "train_top1"}
  assert result["top1"] > 0.95 and result["train_top1"] > 0.95
  assert result["top5"] >= result["top1"]


def test_linear_eval_agrees_with_sklearn_on_digits():
  datasets = pytest.importorskip("sklearn.datasets")
  linear_model = pytest.importorskip("sklearn.linear_model")
  x, y = datasets.load_digits(return_X_y=True)
  order = np.random.default_rng(0).permutation(len(x))
  x, y = x[order].astype(np.float32), y[order].astype(np.int32)
  train_x, train_y, test_x, test_y = x[:1200], y[:1200], x[1200:], y[1200:]
  mean, std = train_x.mean(0), np.where(train_x.std(0) > 0, train_x.std(0), 1)
  reference = linear_model.LogisticRegression(max_iter=2000).fit(
      (train_x - mean) / std, train_y).score((test_x - mean) / std, test_y)
  # The full protocol: 90 epochs, lr 30, batch 256 (1200 = 4 * 256 + 176).
  for standardize in (False, True):
    result = linear_eval_features.linear_eval_on_features(
        train_x, train_y, test_x, test_y, num_classes=10,
        rng=jax.random.key(1), standardize=standardize, **PROTOCOL)
    assert abs(result["top1"] - reference) < 0.04, (result, reference)
    assert result["top5"] >= result["top1"]


def _softmax_grads(w, b, x, y):
  """Mean cross-entropy gradients of logits ``x @ w + b`` (numpy)."""
  logits = x @ w + b
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  p[np.arange(len(y)), y] -= 1.0
  return x.T @ p / len(y), p.mean(0)


def test_train_linear_classifier_matches_numpy_sgd():
  # 10 examples, batch 4: batches of 4, 4 and a partial 2 in every epoch.
  rng = np.random.default_rng(8)
  x = rng.normal(size=(10, 3)).astype(np.float32)
  y = rng.integers(0, 3, 10).astype(np.int32)
  key = jax.random.key(9)
  params, epoch_losses = linear_eval_features.train_linear_classifier(
      x, y, num_classes=3, rng=key, epochs=3, batch_size=4,
      learning_rate=0.5, momentum=0.9, weight_decay=0.01, decay_epochs=(2,))
  assert epoch_losses.shape == (3,)

  init_key, shuffle_key = jax.random.split(key)
  init = models.LinearClassifier(3).init(init_key, x[:1])["params"]["fc"]
  w, b = np.array(init["kernel"], np.float64), np.array(init["bias"],
                                                        np.float64)
  assert np.all(b == 0) and 0.002 < w.std() < 0.05  # N(0, 0.01), zero bias.
  momentum_w, momentum_b, step = np.zeros_like(w), np.zeros_like(b), 0
  for epoch_key in jax.random.split(shuffle_key, 3):
    order = np.asarray(jax.random.permutation(epoch_key, 10))
    for rows in (order[:4], order[4:8], order[8:]):
      grad_w, grad_b = _softmax_grads(w, b, x[rows], y[rows])
      momentum_w = 0.9 * momentum_w + grad_w + 0.01 * w
      momentum_b = 0.9 * momentum_b + grad_b + 0.01 * b
      lr = 0.5 if step < 2 * 3 else 0.05
      w, b, step = w - lr * momentum_w, b - lr * momentum_b, step + 1
  np.testing.assert_allclose(params["fc"]["kernel"], w, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(params["fc"]["bias"], b, rtol=1e-4, atol=1e-6)


def test_linear_eval_schedule_boundaries():
  schedule = linear_eval_features.linear_eval_schedule(30.0, 10, (60, 80))
  values = {s: float(schedule(s)) for s in (0, 599, 600, 799, 800, 899)}
  np.testing.assert_allclose(
      list(values.values()), [30.0, 30.0, 3.0, 3.0, 0.3, 0.3], rtol=1e-6)
