"""What a pretraining run builds from its config, built once.

:func:`build_pretraining` reads the config and returns a
:class:`Pretraining`: the method, the encoder and its backbone, the
optimizer and its schedule, and the values that depend on the data
(:class:`Derived`: the run's length, its warm-up and kNN cadence), from
which the initial state and the jitted step are made. The training loop,
the linear evaluation, the benchmarks, the K sweep and the tests all build
through here. Core layer: no data, no TensorFlow; the data's steps per
epoch are an argument, so a caller that has no dataset can still build.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from eqco_jax.core import device_augment
from eqco_jax.core import models
from eqco_jax.core.methods import METHODS, Method
from eqco_jax.core.training import optim
from eqco_jax.core.training import train_step as train_step_lib
from eqco_jax.core.training.train_state import TrainState

# The Method fields every method takes; its own fields beyond these are the
# config fields of the same name (SiMo's ``symmetric``, MoCo v2's
# ``queue_size`` and ``shuffle_bn``).
_COMMON_METHOD_FIELDS = ("temperature", "alpha", "num_negatives")


@dataclasses.dataclass(frozen=True)
class Derived:
  """The config's values that depend on the data, in steps.

  Attributes:
    steps_per_epoch: the data's whole global batches per pass over the
      pretraining split.
    total_steps: ``num_train_steps`` if > 0, else ``num_epochs`` epochs.
    warmup_steps: ``warmup_epochs`` epochs if > 0, else ``warmup_steps``.
    eval_every_steps: the kNN monitor's cadence, ``eval_every_epochs``
      epochs if > 0, else ``eval_every_steps`` (-1: never).
  """
  steps_per_epoch: int
  total_steps: int
  warmup_steps: int
  eval_every_steps: int


def derived(config: ml_collections.ConfigDict,
            steps_per_epoch: int) -> Derived:
  """The values of ``config`` that depend on the data's steps per epoch."""
  def epochs(value: float) -> int:
    return max(1, round(value * steps_per_epoch))

  return Derived(
      steps_per_epoch=steps_per_epoch,
      total_steps=(int(config.num_train_steps) if config.num_train_steps > 0
                   else int(config.num_epochs * steps_per_epoch)),
      warmup_steps=(epochs(config.warmup_epochs) if config.warmup_epochs > 0
                    else int(config.warmup_steps)),
      eval_every_steps=(epochs(config.eval_every_epochs)
                        if config.eval_every_epochs > 0
                        else int(config.eval_every_steps)))


def loss_alpha(config: ml_collections.ConfigDict) -> float | None:
  """The ``alpha`` the loss gets: None (plain InfoNCE) unless EqCo is on."""
  return config.alpha if config.eqco else None


def negatives_per_query(config: ml_collections.ConfigDict) -> int:
  """K, the negatives each query really sees."""
  if config.num_negatives:
    return int(config.num_negatives)
  return (config.queue_size if config.method == "mocov2"
          else config.batch_size - 1)


def method_of(config: ml_collections.ConfigDict) -> Method:
  """The method ``config.method`` names, with the config's loss settings."""
  method_type = METHODS[config.method]
  options = {field.name: config[field.name]
             for field in dataclasses.fields(method_type)
             if field.init and field.name not in _COMMON_METHOD_FIELDS}
  return method_type(temperature=config.temperature,
                     alpha=loss_alpha(config),
                     num_negatives=config.num_negatives, **options)


def backbone_of(config: ml_collections.ConfigDict) -> models.ResNet:
  """The config's backbone alone, for feature extraction and export (BN
  statistics over the whole batch, no rematerialisation)."""
  return models.create_backbone(
      config.model, width=config.width,
      small_image_stem=config.small_image_stem,
      zero_init_residual=config.zero_init_residual,
      dtype=models.DTYPES[config.dtype])


@dataclasses.dataclass(frozen=True)
class Pretraining:
  """A pretraining run's parts, each built once from its config.

  Attributes:
    config: the config they were built from.
    method: SiMo or MoCo v2 with the config's loss.
    encoder: backbone + head, shared by the online and momentum branches.
    backbone: the backbone alone, for evaluation and export (BN over the
      whole batch, no rematerialisation).
    tx: the optimizer.
    schedule: its learning rate, step -> lr.
    derived: the values that depend on the data.
  """
  config: ml_collections.ConfigDict
  method: Method
  encoder: models.Encoder
  backbone: models.ResNet
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  derived: Derived

  @property
  def total_steps(self) -> int:
    """The run's length in optimizer steps."""
    return self.derived.total_steps

  def initial_state(self, mesh: Mesh) -> TrainState:
    """A fresh TrainState for ``config.seed``, born replicated on ``mesh``."""
    c = self.config
    create = functools.partial(
        train_step_lib.create_train_state, encoder=self.encoder, tx=self.tx,
        method=self.method, image_shape=(c.image_size, c.image_size, 3),
        embed_dim=c.head_out_dim)
    return train_step_lib.jit_create_train_state(create, mesh)(
        jax.random.key(c.seed))

  def preprocess(self, *, mean: tuple[float, ...], std: tuple[float, ...]
                 ) -> train_step_lib.Preprocess:
    """uint8 views -> normalised float32 views with the dataset's ``mean``
    and ``std`` (RGB, on [0, 1]), after the colour stage when
    ``config.augment.on_device``."""
    return functools.partial(device_augment.prepare_views,
                             augment_config=self.config.augment, mean=mean,
                             std=std)

  def jit_train_step(self, mesh: Mesh,
                     preprocess: train_step_lib.Preprocess
                     ) -> train_step_lib.TrainStep:
    """The step, jitted over ``mesh``; ``preprocess`` makes the model's
    inputs from a batch (usually :meth:`preprocess`)."""
    step = train_step_lib.make_train_step(
        self.method, self.encoder, self.tx, self.schedule, preprocess,
        ema_momentum=self.config.ema_momentum)
    return train_step_lib.jit_train_step(step, mesh)


def build_pretraining(config: ml_collections.ConfigDict,
                      steps_per_epoch: int) -> Pretraining:
  """Reads ``config`` once into the parts of a run on data of
  ``steps_per_epoch`` global batches per epoch."""
  c = config
  encoder = models.create_encoder(
      c.model, c.head, width=c.width, small_image_stem=c.small_image_stem,
      head_hidden_dim=c.head_hidden_dim, head_out_dim=c.head_out_dim,
      bn_group_size=c.bn_group_size,
      zero_init_residual=c.zero_init_residual,
      dtype=models.DTYPES[c.dtype], remat=c.remat)
  lengths = derived(c, steps_per_epoch)
  schedule = optim.learning_rate_schedule(
      c.base_learning_rate, c.batch_size, lengths.warmup_steps,
      lengths.total_steps)
  tx = optim.create_optimizer(c.optimizer, schedule,
                              weight_decay=c.weight_decay,
                              momentum=c.sgd_momentum)
  return Pretraining(config=c, method=method_of(c), encoder=encoder,
                     backbone=backbone_of(c), tx=tx, schedule=schedule,
                     derived=lengths)

