"""The pure pretraining step and its jit over the mesh.

``train_step(state, batch) -> (state, metrics)`` is written on global arrays:
under ``jax.jit`` with the batch sharded on the ``data`` axis, BatchNorm
statistics, the in-batch negatives and the loss mean are all global, so the
same code runs on one CPU, eight GPUs or a TPU pod. What differs between SiMo
and MoCo v2 is asked of the :class:`~eqco_jax.core.methods.Method`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from eqco_jax.core import sharding
from eqco_jax.core.methods import Method
from eqco_jax.core.training.train_state import TrainState, copy_tree, ema_update
from eqco_jax.core.types import Metrics

Batch = dict[str, jax.Array]
# preprocess(rng, batch) -> (view1, view2): float32 [B, H, W, C] each.
Preprocess = Callable[[jax.Array, Batch], tuple[jax.Array, jax.Array]]
TrainStep = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]


def create_train_state(
    rng: jax.Array,
    encoder: nn.Module,
    tx: optax.GradientTransformation,
    method: Method,
    *,
    image_shape: tuple[int, int, int],
    embed_dim: int,
) -> TrainState:
  """Initial state: random online encoder, an identical key encoder, and the
  method's queue (None for SiMo).

  Args:
    rng: typed PRNG key of the run.
    encoder: the Flax encoder (backbone + head) shared by both branches.
    tx: the optimizer.
    method: SiMo or MoCo v2.
    image_shape: ``(H, W, C)`` of a view.
    embed_dim: D, the head's output width.
  """
  init_rng, queue_rng, run_rng = jax.random.split(rng, 3)
  variables = encoder.init(init_rng, jnp.zeros((2, *image_shape)), train=False)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  queue, queue_ptr = method.init_queue(queue_rng, embed_dim)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      momentum_params=copy_tree(params),
      momentum_batch_stats=copy_tree(batch_stats),
      opt_state=tx.init(params),
      key_data=jax.random.key_data(run_rng),
      queue=queue,
      queue_ptr=queue_ptr)


def _forward(encoder: nn.Module, params, batch_stats, images,
             bn_order: jax.Array | None = None) -> tuple[jax.Array, Any]:
  """Train-mode forward: ``(embeddings [B, D], new batch_stats)``."""
  out, new_vars = encoder.apply(
      {"params": params, "batch_stats": batch_stats}, images, train=True,
      bn_order=bn_order, mutable=["batch_stats"])
  return out["embedding"], new_vars["batch_stats"]


def _mean(values: list) -> Any:
  """Leaf-wise mean of a list of equally shaped pytrees."""
  return jax.tree.map(lambda *xs: sum(xs) / len(xs), *values)


def make_train_step(
    method: Method,
    encoder: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    preprocess: Preprocess,
    *,
    ema_momentum: float,
) -> TrainStep:
  """Builds the pure step of ``method``.

  Per step: EMA of the key encoder (before the key forward), keys from the
  key encoder in BN train mode with its own statistics, queries and gradient
  from the online encoder, the method's loss (averaged over both directions
  when ``method.symmetric``), an optimizer update, the method's queue update
  with the first direction's keys.
  """
  forward = functools.partial(_forward, encoder)

  def train_step(state: TrainState, batch: Batch
                 ) -> tuple[TrainState, Metrics]:
    augment_rng, shuffle_rng, negatives_rng = jax.random.split(
        state.step_key(), 3)
    view1, view2 = preprocess(augment_rng, batch)
    # (query view, key view) per loss direction.
    directions = [(view1, view2)] + ([(view2, view1)] if method.symmetric
                                     else [])
    momentum_params = ema_update(
        state.momentum_params, state.params, ema_momentum)
    momentum_stats, keys = state.momentum_batch_stats, []
    for i, (_, key_view) in enumerate(directions):
      key, momentum_stats = method.key_embeddings(
          functools.partial(forward, momentum_params, momentum_stats),
          key_view, jax.random.fold_in(shuffle_rng, i))
      keys.append(jax.lax.stop_gradient(key))

    def loss_fn(params):
      batch_stats, outputs = state.batch_stats, []
      for i, ((query_view, _), key) in enumerate(zip(directions, keys)):
        query, batch_stats = forward(params, batch_stats, query_view)
        outputs.append(method.loss(query, key, state.queue,
                                   jax.random.fold_in(negatives_rng, i)))
      loss, metrics = _mean(outputs)
      return loss, (batch_stats, metrics)

    (loss, (batch_stats, metrics)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    queue, queue_ptr = method.update_queue(state.queue, state.queue_ptr,
                                           keys[0])
    new_state = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats, momentum_params=momentum_params,
        momentum_batch_stats=momentum_stats, opt_state=opt_state, queue=queue,
        queue_ptr=queue_ptr)
    metrics = dict(metrics, loss=loss, learning_rate=schedule(state.step),
                   grad_norm=optax.tree.norm(grads))
    return new_state, metrics

  return train_step


def jit_train_step(train_step: TrainStep, mesh: Mesh) -> TrainStep:
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
