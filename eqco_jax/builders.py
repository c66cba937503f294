"""Builders from a config: the method, the encoder, the backbone, the
optimizer and the initial train state.

Shared by the training loop, the linear evaluation, the benchmarks and the
K sweep. Core layer: no data, no TensorFlow; the number of training steps is
an argument, so a caller that has no dataset (a benchmark) can still build.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from eqco_jax import config as config_lib
from eqco_jax import device_augment
from eqco_jax import models
from eqco_jax import optim
from eqco_jax import train_step as train_step_lib
from eqco_jax.methods import Method, MoCoV2, SiMo
from eqco_jax.train_state import TrainState

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def create_method(config: ml_collections.ConfigDict) -> Method:
  """SiMo or MoCo v2 with the config's loss settings."""
  alpha = config_lib.loss_alpha(config)
  if config.method == "simo":
    return SiMo(temperature=config.temperature, alpha=alpha,
                num_negatives=config.num_negatives,
                symmetric=bool(config.symmetric))
  if config.method == "mocov2":
    return MoCoV2(temperature=config.temperature, alpha=alpha,
                  queue_size=config.queue_size,
                  num_negatives=config.num_negatives,
                  shuffle_bn=bool(config.shuffle_bn))
  raise ValueError(f"method={config.method!r} is not known; use one of "
                   "('simo', 'mocov2').")


def create_encoder(config: ml_collections.ConfigDict) -> models.Encoder:
  """The encoder (backbone + head) the config describes."""
  return models.create_encoder(
      config.model, config.head, width=config.width,
      small_image=config.small_image_stem,
      head_hidden_dim=config.head_hidden_dim,
      head_out_dim=config.head_out_dim, bn_group_size=config.bn_group_size,
      zero_init_residual=config.zero_init_residual,
      dtype=DTYPES[config.dtype], remat=config.remat)


def create_backbone(config: ml_collections.ConfigDict) -> models.ResNet:
  """The encoder's backbone alone, for feature extraction (BN in eval mode)."""
  return models.create_backbone(
      config.model, width=config.width, small_image=config.small_image_stem,
      zero_init_residual=config.zero_init_residual,
      dtype=DTYPES[config.dtype])


def create_optimizer(config: ml_collections.ConfigDict, total_steps: int
                     ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """``(tx, schedule)`` of a run of ``total_steps`` steps."""
  schedule = optim.learning_rate_schedule(
      config.base_learning_rate, config.batch_size, config.warmup_steps,
      total_steps)
  return optim.create_optimizer(config, schedule), schedule


def initial_state(config: ml_collections.ConfigDict, encoder: models.Encoder,
                  tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
  """A fresh, replicated TrainState for ``config.seed``."""
  create = functools.partial(
      train_step_lib.create_train_state, encoder=encoder, tx=tx,
      method=create_method(config),
      image_shape=(config.image_size, config.image_size, 3),
      embed_dim=config.head_out_dim)
  return train_step_lib.jit_create_train_state(create, mesh)(
      jax.random.key(config.seed))


def create_train_step(
    config: ml_collections.ConfigDict, encoder: models.Encoder,
    tx: optax.GradientTransformation, schedule: optax.Schedule, mesh: Mesh,
    *, mean: tuple[float, ...], std: tuple[float, ...],
) -> train_step_lib.TrainStep:
  """The config's step, jitted over ``mesh``.

  Views arrive as uint8; they are normalised with the dataset's ``mean`` and
  ``std`` (RGB, on [0, 1]) inside the step, after the colour stage when
  ``config.augment.on_device``.
  """
  preprocess = functools.partial(
      device_augment.prepare_views, augment_config=config.augment,
      mean=mean, std=std)
  step = train_step_lib.make_train_step(
      create_method(config), encoder, tx, schedule, preprocess,
      ema_momentum=config.ema_momentum)
  return train_step_lib.jit_train_step(step, mesh)
