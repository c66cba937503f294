"""The pure pretraining step of SiMo and MoCo v2, and its jit over the mesh.

``train_step(state, batch) -> (state, metrics)`` is written on global arrays:
under ``jax.jit`` with the batch sharded on the ``data`` axis, BatchNorm
statistics, the in-batch negatives and the loss mean are all global, so the
same code runs on one CPU, eight GPUs or a TPU pod.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from eqco_jax import config as config_lib
from eqco_jax import sharding
from eqco_jax.methods import mocov2
from eqco_jax.methods import simo
from eqco_jax.train_state import TrainState, copy_tree, ema_update

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# preprocess(rng, batch) -> (view1, view2): float32 [B, H, W, C] each.
Preprocess = Callable[[jax.Array, Batch], tuple[jax.Array, jax.Array]]


def create_train_state(
    rng: jax.Array,
    encoder: nn.Module,
    tx: optax.GradientTransformation,
    *,
    image_shape: tuple[int, int, int],
    embed_dim: int,
    queue_size: int | None,
) -> TrainState:
  """Initial state: random online encoder, an identical key encoder, a queue.

  Args:
    rng: typed PRNG key of the run.
    encoder: the Flax encoder (backbone + head) shared by both branches.
    tx: the optimizer.
    image_shape: ``(H, W, C)`` of a view.
    embed_dim: D, the head's output width.
    queue_size: K for MoCo v2's queue, None for SiMo (no queue).
  """
  init_rng, queue_rng, run_rng = jax.random.split(rng, 3)
  variables = encoder.init(init_rng, jnp.zeros((2, *image_shape)), train=False)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  queue = ptr = None
  if queue_size:
    queue = mocov2.init_queue(queue_rng, queue_size, embed_dim)
    ptr = jnp.zeros((), jnp.int32)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      momentum_params=copy_tree(params),
      momentum_batch_stats=copy_tree(batch_stats),
      opt_state=tx.init(params),
      rng=jax.random.key_data(run_rng),
      queue=queue,
      queue_ptr=ptr)


def _forward(encoder: nn.Module, params, batch_stats, images
             ) -> tuple[jax.Array, Any]:
  """Train-mode forward: ``(embeddings [B, D], new batch_stats)``."""
  out, new_vars = encoder.apply(
      {"params": params, "batch_stats": batch_stats}, images, train=True,
      mutable=["batch_stats"])
  return out["embedding"], new_vars["batch_stats"]


def make_train_step(
    config: ml_collections.ConfigDict,
    encoder: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    preprocess: Preprocess,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """Builds the pure step for ``config.method`` ("simo" or "mocov2").

  Per step: EMA of the key encoder (before the key forward), keys from the
  key encoder in BN train mode with its own statistics (shuffled for MoCo's
  Shuffle BN), queries and gradient from the online encoder, the EqCo loss,
  an optimizer update and, for MoCo, the queue update.
  """
  is_moco = config.method == "mocov2"
  symmetric = bool(config.get("symmetric", False))
  shuffle_bn = is_moco and bool(config.get("shuffle_bn", True))
  forward = functools.partial(_forward, encoder)
  alpha = config_lib.loss_alpha(config)

  def direction_loss(query, key, queue, rng):
    if is_moco:
      return mocov2.mocov2_loss(query, key, queue,
                                temperature=config.temperature,
                                alpha=alpha,
                                num_negatives=config.num_negatives, rng=rng)
    return simo.simo_loss(query, key, temperature=config.temperature,
                          alpha=alpha,
                          num_negatives=config.num_negatives, rng=rng)

  def train_step(state: TrainState, batch: Batch
                 ) -> tuple[TrainState, Metrics]:
    augment_rng, shuffle_rng, negatives_rng = jax.random.split(
        state.step_key(), 3)
    view1, view2 = preprocess(augment_rng, batch)
    # (query view, key view) per loss direction.
    directions = [(view1, view2)] + ([(view2, view1)] if symmetric else [])

    momentum_params = ema_update(
        state.momentum_params, state.params, config.momentum)
    momentum_stats = state.momentum_batch_stats
    keys = []
    for i, (_, key_view) in enumerate(directions):
      key_forward = functools.partial(forward, momentum_params, momentum_stats)
      if shuffle_bn:
        key, momentum_stats = mocov2.shuffled_forward(
            key_forward, key_view, jax.random.fold_in(shuffle_rng, i))
      else:
        key, momentum_stats = key_forward(key_view)
      keys.append(jax.lax.stop_gradient(key))

    def loss_fn(params):
      batch_stats, losses, metrics = state.batch_stats, [], []
      for i, ((query_view, _), key) in enumerate(zip(directions, keys)):
        query, batch_stats = forward(params, batch_stats, query_view)
        loss, direction_metrics = direction_loss(
            query, key, state.queue, jax.random.fold_in(negatives_rng, i))
        losses.append(loss)
        metrics.append(direction_metrics)
      mean = lambda xs: sum(xs) / len(xs)
      return mean(losses), (batch_stats, jax.tree.map(lambda *m: mean(m),
                                                      *metrics))

    (loss, (batch_stats, metrics)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    queue, queue_ptr = state.queue, state.queue_ptr
    if is_moco:
      queue, queue_ptr = mocov2.enqueue(queue, queue_ptr, keys[0])
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats,
        momentum_params=momentum_params, momentum_batch_stats=momentum_stats,
        opt_state=opt_state, queue=queue, queue_ptr=queue_ptr)
    metrics = dict(metrics, loss=loss, learning_rate=schedule(state.step),
                   grad_norm=optax.tree.norm(grads))
    return new_state, metrics

  return train_step


def jit_train_step(
    train_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]],
    mesh: Mesh,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """``jax.jit`` over the mesh: batch sharded on ``data``, state replicated
  and donated, metrics replicated."""
  replicated = sharding.replicated(mesh)
  return jax.jit(
      train_step,
      in_shardings=(replicated, sharding.batch_sharding(mesh)),
      out_shardings=(replicated, replicated),
      donate_argnums=0)


def jit_create_train_state(
    create: Callable[[jax.Array], TrainState], mesh: Mesh
) -> Callable[[jax.Array], TrainState]:
  """``create(rng) -> TrainState`` jitted so the state is born replicated."""
  return jax.jit(create, out_shardings=sharding.replicated(mesh))
