"""eqco_jax.core.evaluate.linear_eval_images: the linear classifier trained
through the frozen backbone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eqco_jax.core import models
from eqco_jax.core import sharding
from eqco_jax.core.evaluate import linear_eval_features
from eqco_jax.core.evaluate import linear_eval_images
from eqco_jax.core.evaluate.features import backbone_apply_fn


@pytest.fixture(scope="module")
def tiny_backbone():
  """A resnet10 of width 4 on 8x8 images, with non-trivial BN statistics."""
  backbone = models.create_backbone("resnet10", width=4, small_image_stem=True)
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
  return backbone_apply_fn(backbone), variables, backbone


def _sixteen_images(seed: int):
  """``(mesh, put, rng, images)``: the mesh of every device, what puts a
  batch on it, and 16 random uint8 8x8 images drawn from ``rng``."""
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
  return (mesh, lambda x: jax.device_put(x, sharding.batch_sharding(mesh)),
          rng, images)


def _normalize(images):
  return images.astype(jnp.float32) / 127.5 - 1.0


def test_linear_train_step_frozen_backbone_and_learns(tiny_backbone):
  apply_backbone, variables, backbone = tiny_backbone
  mesh, put, rng, images = _sixteen_images(4)
  labels = rng.integers(0, 10, 16).astype(np.int32)
  batch = {"image": put(images), "label": put(labels)}

  schedule = linear_eval_features.linear_eval_schedule(5.0, 4, (2,))
  tx = linear_eval_features.linear_eval_optimizer(schedule, momentum=0.9,
                                                  weight_decay=0.0)
  state = linear_eval_images.create_linear_eval_state(
      jax.random.key(5), backbone.num_features, 10, tx)
  initial_params = jax.tree.map(np.asarray, state.params)
  frozen = jax.tree.map(np.array, variables)
  step = linear_eval_images.jit_linear_train_step(
      linear_eval_images.make_linear_train_step(apply_backbone, tx, 10,
                                                 _normalize, schedule), mesh)
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
  mesh, put, rng, images = _sixteen_images(6)
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

  result = linear_eval_images.evaluate_classifier(
      apply_backbone, variables, params, batches(labels, images), _normalize)
  assert result["top1"] == pytest.approx(7 / 13)
  assert result["top5"] == pytest.approx(top5)
  assert result["top5"] >= result["top1"]
  assert result["examples"] == 13  # the real rows
  # Whatever the padded rows hold does not matter.
  images2, labels2 = images.copy(), labels.copy()
  images2[13:], labels2[13:] = 0, predicted[13:]
  assert linear_eval_images.evaluate_classifier(
      apply_backbone, variables, params, batches(labels2, images2),
      _normalize) == result


def test_linear_train_step_ignores_masked_rows(tiny_backbone):
  apply_backbone, variables, backbone = tiny_backbone
  rng = np.random.default_rng(10)
  images = rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 8).astype(np.int32)
  tx = linear_eval_features.linear_eval_optimizer(1.0, momentum=0.9,
                                                  weight_decay=0.0)
  state = linear_eval_images.create_linear_eval_state(
      jax.random.key(11), backbone.num_features, 10, tx)
  step = jax.jit(linear_eval_images.make_linear_train_step(
      apply_backbone, tx, 10, _normalize))
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
