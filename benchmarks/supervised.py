"""The supervised baseline of the step benchmark: the pretraining backbone and
optimizer, a linear classifier, cross-entropy on labels, one view.

SiMo's asymmetric step does about 4/3 of this step's work (a key forward on
top of one forward and backward), so their ratio of images/s says how close
the contrastive step is to the cost of the network itself.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from eqco_jax.core import device_augment
from eqco_jax.core import sharding
from eqco_jax.core.models import LinearClassifier
from eqco_jax.core.training import builders

Batch = dict[str, jax.Array]


class Classifier(nn.Module):
  """Backbone + linear layer: images [N, H, W, 3] -> logits [N, classes]."""
  backbone: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    features = self.backbone(images, train=train)
    return LinearClassifier(self.num_classes)(features)


class SupervisedState(struct.PyTreeNode):
  """Step, parameters, BN statistics and optimizer state."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState


def state_and_step(
    run: builders.Pretraining, mesh: Mesh, *, num_classes: int,
    mean: tuple[float, ...], std: tuple[float, ...],
) -> tuple[SupervisedState, Callable[[SupervisedState, Batch],
                                     tuple[SupervisedState, dict]]]:
  """A replicated initial state and the jitted step on ``{'image' uint8
  [B, H, W, 3], 'label' int [B]}`` batches sharded on ``mesh``: ``run``'s
  backbone and optimizer, a linear classifier and cross-entropy."""
  config, tx = run.config, run.tx
  model = Classifier(run.encoder.backbone, num_classes)
  shape = (2, config.image_size, config.image_size, 3)

  def create(rng: jax.Array) -> SupervisedState:
    variables = model.init(rng, jnp.zeros(shape), train=False)
    return SupervisedState(step=jnp.zeros((), jnp.int32),
                           params=variables["params"],
                           batch_stats=variables["batch_stats"],
                           opt_state=tx.init(variables["params"]))

  def step(state: SupervisedState, batch: Batch
           ) -> tuple[SupervisedState, dict]:
    images = device_augment.normalize(batch["image"], mean, std)

    def loss_fn(params):
      logits, new_vars = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, images,
          train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits.astype(jnp.float32), batch["label"]).mean()
      return loss, new_vars["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats, opt_state=opt_state), {"loss": loss}

  replicated = sharding.replicated(mesh)
  state = jax.jit(create, out_shardings=replicated)(
      jax.random.key(config.seed))
  jitted = jax.jit(step, in_shardings=(replicated,
                                       sharding.batch_sharding(mesh)),
                   out_shardings=(replicated, replicated), donate_argnums=0)
  return state, jitted
