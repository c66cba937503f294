"""Evaluation: top-k, weighted kNN, feature extraction, linear evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eqco_jax import evaluate
from eqco_jax import models
from eqco_jax import sharding


def _clusters(rng, n, dim, num_classes, spread):
  """Gaussian blobs around random unit centres: ``(x [n, dim], y [n])``."""
  centres = rng.normal(size=(num_classes, dim))
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  y = rng.integers(0, num_classes, n).astype(np.int32)
  x = centres[y] + spread * rng.normal(size=(n, dim))
  return x.astype(np.float32), y


def _knn_reference(train_x, train_y, test_x, num_classes, k, temperature):
  """Brute-force weighted kNN in numpy (float64)."""
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  similarity = unit(test_x.astype(np.float64)) @ unit(
      train_x.astype(np.float64)).T
  top = np.argsort(-similarity, axis=1)[:, :k]
  votes = np.zeros((len(test_x), num_classes))
  for i in range(len(test_x)):
    for j in top[i]:
      votes[i, train_y[j]] += np.exp(similarity[i, j] / temperature)
  return votes.argmax(axis=1)


# ---------------------------------------------------------------- top-k.


def test_topk_accuracy():
  logits = jnp.array([[0.1, 0.5, 0.2, 0.0],
                      [0.9, 0.1, 0.3, 0.2],
                      [0.0, 0.0, 0.0, 0.0]])
  labels = jnp.array([2, 2, 3])
  np.testing.assert_array_equal(evaluate.topk_accuracy(logits, labels, 1),
                                [0, 0, 0])
  np.testing.assert_array_equal(evaluate.topk_accuracy(logits, labels, 2),
                                [1, 1, 0])  # Ties go to the lower index.
  np.testing.assert_array_equal(evaluate.topk_accuracy(logits, labels, 9),
                                [1, 1, 1])  # k clipped to the classes.


# ------------------------------------------------------------------ kNN.


@pytest.mark.parametrize("chunk_size", [8, 1024])
def test_knn_matches_numpy_reference(chunk_size):
  rng = np.random.default_rng(0)
  train_x = rng.normal(size=(300, 16)).astype(np.float32) * 3.0
  train_y = rng.integers(0, 7, 300).astype(np.int32)
  test_x = rng.normal(size=(37, 16)).astype(np.float32)  # 37: ragged chunks.
  for k, temperature in [(20, 0.07), (5, 0.5)]:
    got = evaluate.knn_predict(train_x, train_y, test_x, num_classes=7, k=k,
                               temperature=temperature, chunk_size=chunk_size)
    assert got.shape == (37,) and got.dtype == jnp.int32
    np.testing.assert_array_equal(
        got, _knn_reference(train_x, train_y, test_x, 7, k, temperature))


def test_knn_weighting_beats_majority():
  # Query [1, 0]: one class-0 neighbour at cosine 1, two class-1 at 0.9.
  angle = np.arccos(0.9)
  train_x = np.array([[1.0, 0.0], [np.cos(angle), np.sin(angle)],
                      [np.cos(angle), -np.sin(angle)]], np.float32)
  train_y = np.array([0, 1, 1], np.int32)
  test_x = np.array([[2.0, 0.0]], np.float32)  # Scale must not matter.
  predict = lambda t: int(evaluate.knn_predict(
      train_x, train_y, test_x, num_classes=2, k=3, temperature=t)[0])
  assert predict(0.07) == 0  # e^(1/.07) > 2 e^(.9/.07).
  assert predict(1.0) == 1  # e^1 < 2 e^.9: nearly a majority vote.
  np.testing.assert_array_equal(
      [predict(0.07), predict(1.0)],
      [_knn_reference(train_x, train_y, test_x, 2, 3, t)[0]
       for t in (0.07, 1.0)])


def test_knn_clusters_and_chance():
  rng = np.random.default_rng(1)
  x, y = _clusters(rng, 1500, 32, 10, spread=0.05)
  acc = evaluate.knn_accuracy(x[:1000], y[:1000], x[1000:], y[1000:],
                              num_classes=10)
  assert acc > 0.99
  shuffled = rng.permutation(y)  # Labels unrelated to the features.
  acc = evaluate.knn_accuracy(x[:1000], shuffled[:1000], x[1000:],
                              shuffled[1000:], num_classes=10)
  assert 0.03 < acc < 0.2


# ------------------------------------------------------ feature extraction.


def test_extract_features_drops_padding_keeps_order():
  mesh = sharding.make_mesh()
  put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (21, 2, 2, 3), dtype=np.uint8)
  labels = np.arange(21, dtype=np.int32)
  batches, expected_rows = [], []
  for start in range(0, 24, 8):  # 8 + 8 + (5 real + 3 padding).
    rows = np.arange(start, min(start + 8, 21))
    pad = 8 - len(rows)
    batch_images = np.concatenate(
        [images[rows], np.full((pad, 2, 2, 3), 255, np.uint8)])
    batch_labels = np.concatenate([labels[rows], np.full(pad, -1, np.int32)])
    batches.append({"image": put(batch_images), "label": put(batch_labels),
                    "mask": put(np.arange(8) < len(rows))})
    expected_rows.extend(rows)

  def apply_backbone(variables, x):
    return x.reshape(x.shape[0], -1)[:, :5] * variables["scale"]

  normalize = lambda x: x.astype(jnp.float32) / 255.0
  variables = {"scale": jnp.float32(2.0)}
  features, got_labels = evaluate.extract_features(
      apply_backbone, variables, batches, normalize)
  assert features.shape == (21, 5) and features.dtype == np.float32
  assert got_labels.dtype == np.int32
  np.testing.assert_array_equal(got_labels, labels)
  np.testing.assert_allclose(
      features, images.reshape(21, -1)[:, :5] / 255.0 * 2.0, rtol=1e-6)


# ------------------------------------------------- linear eval, features.


def test_linear_eval_on_separable_features():
  rng = np.random.default_rng(3)
  x, y = _clusters(rng, 1500, 32, 10, spread=0.1)
  result = evaluate.linear_eval_on_features(
      x[:1000], y[:1000], x[1000:], y[1000:], num_classes=10,
      rng=jax.random.key(0), epochs=10, decay_epochs=(6, 8))
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
    result = evaluate.linear_eval_on_features(
        train_x, train_y, test_x, test_y, num_classes=10,
        rng=jax.random.key(1), standardize=standardize)
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
  params, epoch_losses = evaluate.train_linear_classifier(
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
  schedule = evaluate.linear_eval_schedule(30.0, 10, (60, 80))
  values = {s: float(schedule(s)) for s in (0, 599, 600, 799, 800, 899)}
  np.testing.assert_allclose(
      list(values.values()), [30.0, 30.0, 3.0, 3.0, 0.3, 0.3], rtol=1e-6)


# ----------------------------------------- linear eval through the backbone.


@pytest.fixture(scope="module")
def tiny_backbone():
  """A resnet10 of width 4 on 8x8 images, with non-trivial BN statistics."""
  backbone = models.create_backbone("resnet10", width=4, small_image=True)
  variables = backbone.init(jax.random.key(0), jnp.zeros((2, 8, 8, 3)),
                            train=False)
  # Running statistics away from (0, 1): inference and train mode differ.
  leaves, treedef = jax.tree.flatten_with_path(variables["batch_stats"])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  stats = jax.tree.unflatten(treedef, [
      s + 0.2 * jax.random.normal(k, s.shape) if path[-1].key == "mean"
      else s * jax.random.uniform(k, s.shape, minval=0.5, maxval=2.0)
      for (path, s), k in zip(leaves, keys)])
  variables = {"params": variables["params"], "batch_stats": stats}
  return evaluate.backbone_apply_fn(backbone), variables, backbone


def _normalize(images):
  return images.astype(jnp.float32) / 127.5 - 1.0


def test_linear_train_step_frozen_backbone_and_learns(tiny_backbone):
  apply_backbone, variables, backbone = tiny_backbone
  mesh = sharding.make_mesh()
  put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
  rng = np.random.default_rng(4)
  images = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 16).astype(np.int32)
  batch = {"image": put(images), "label": put(labels)}

  schedule = evaluate.linear_eval_schedule(5.0, 4, (2,))
  tx = evaluate.linear_eval_optimizer(schedule)
  state = evaluate.create_linear_eval_state(
      jax.random.key(5), backbone.num_features, 10, tx)
  initial_params = jax.tree.map(np.asarray, state.params)
  frozen = jax.tree.map(np.array, variables)
  step = evaluate.jit_linear_train_step(
      evaluate.make_linear_train_step(apply_backbone, tx, 10, _normalize,
                                      schedule), mesh)
  losses, params = [], []
  for _ in range(10):
    state, metrics = step(state, batch, variables)
    losses.append(float(metrics["loss"]))
    params.append(jax.tree.map(np.asarray, state.params))

  # Step 1 is plain SGD (lr 5) on the cross-entropy of the initial classifier
  # over inference-mode features (BN with running statistics).
  features = backbone.apply(variables, _normalize(images), train=False)
  train_mode, _ = backbone.apply(variables, _normalize(images), train=True,
                                 mutable=["batch_stats"])
  assert not np.allclose(features, train_mode, atol=1e-3)

  def loss_fn(params):
    logits = models.LinearClassifier(10).apply({"params": params}, features)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()

  loss, grads = jax.value_and_grad(loss_fn)(initial_params)
  np.testing.assert_allclose(losses[0], loss, rtol=1e-5)
  jax.tree.map(
      lambda got, p, g: np.testing.assert_allclose(got, p - 5.0 * g,
                                                   rtol=1e-4, atol=1e-6),
      params[0], initial_params, grads)

  assert losses[-1] < 0.75 * losses[0], losses
  assert int(state.step) == 10
  assert float(metrics["learning_rate"]) == pytest.approx(0.5)
  assert set(state.params) == {"fc"}  # Only the classifier is trained.
  jax.tree.map(np.testing.assert_array_equal, frozen,
               jax.tree.map(np.asarray, variables))


def test_evaluate_classifier_ignores_masked_rows(tiny_backbone):
  apply_backbone, variables, backbone = tiny_backbone
  mesh = sharding.make_mesh()
  put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
  rng = np.random.default_rng(6)
  images = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
  params = models.LinearClassifier(10).init(
      jax.random.key(7), jnp.zeros((1, backbone.num_features)))["params"]
  logits = models.LinearClassifier(10).apply(
      {"params": params},
      backbone.apply(variables, _normalize(images), train=False))
  predicted = np.asarray(jnp.argmax(logits, axis=1), np.int32)
  # Real rows 0..12: labels right on rows 0..6 -> top-1 = 7 / 13.
  # Padded rows 13..15: wrong labels; counted, they would lower top-1.
  labels = np.where(np.arange(16) < 7, predicted, (predicted + 1) % 10)
  mask = np.arange(16) < 13
  ranks = np.argsort(-np.asarray(logits), axis=1)
  top5 = np.mean([labels[i] in ranks[i, :5] for i in range(13)])

  def batches(labels, images):
    return [{"image": put(images[s:s + 8]),
             "label": put(labels[s:s + 8].astype(np.int32)),
             "mask": put(mask[s:s + 8])} for s in (0, 8)]

  result = evaluate.evaluate_classifier(
      apply_backbone, variables, params, batches(labels, images), _normalize)
  assert result["top1"] == pytest.approx(7 / 13)
  assert result["top5"] == pytest.approx(top5)
  assert result["top5"] >= result["top1"]
  # Whatever the padded rows hold does not matter.
  images2, labels2 = images.copy(), labels.copy()
  images2[13:], labels2[13:] = 0, predicted[13:]
  assert evaluate.evaluate_classifier(
      apply_backbone, variables, params, batches(labels2, images2),
      _normalize) == result


def test_linear_train_step_ignores_masked_rows(tiny_backbone):
  apply_backbone, variables, backbone = tiny_backbone
  rng = np.random.default_rng(10)
  images = rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 8).astype(np.int32)
  tx = evaluate.linear_eval_optimizer(1.0)
  state = evaluate.create_linear_eval_state(
      jax.random.key(11), backbone.num_features, 10, tx)
  step = jax.jit(evaluate.make_linear_train_step(apply_backbone, tx, 10,
                                                 _normalize))
  padded = {"image": images, "label": labels, "mask": np.arange(8) < 5}
  padded_state, padded_metrics = step(state, padded, variables)
  real = {"image": images[:5], "label": labels[:5]}
  real_state, real_metrics = step(state, real, variables)
  for key in ("loss", "top1", "top5"):
    np.testing.assert_allclose(padded_metrics[key], real_metrics[key],
                               rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-7),
               padded_state.params, real_state.params)
