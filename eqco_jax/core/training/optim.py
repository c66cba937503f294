"""Learning-rate schedule and optimizers of the pretraining recipes (optax)."""

from __future__ import annotations

from typing import Callable

import jax
import optax


def learning_rate_schedule(
    base_learning_rate: float, batch_size: int, warmup_steps: int,
    total_steps: int) -> optax.Schedule:
  """Linear warm-up to ``base_lr * batch_size / 256``, then cosine to zero.

  The paper scales the learning rate with the number of queries per step
  (the batch), never with the number of negatives.
  """
  peak = base_learning_rate * batch_size / 256.0
  warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
  if warmup_steps == 0:
    return optax.cosine_decay_schedule(peak, max(total_steps, 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=0.0)


def _is_lars_adapted(path: tuple, _) -> bool:
  """LARS trust ratio and weight decay apply to kernels, not to biases or BN."""
  name = str(getattr(path[-1], "key", path[-1]))
  return name == "kernel"


def sgd(schedule: optax.Schedule, *, weight_decay: float, momentum: float
        ) -> optax.GradientTransformation:
  """SGD with PyTorch's semantics: ``g + wd * p``, then heavy-ball momentum,
  then ``-lr``; weight decay on every parameter, as in the official code."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(schedule, momentum=momentum))


def lars(schedule: optax.Schedule, *, weight_decay: float, momentum: float
         ) -> optax.GradientTransformation:
  """LARS for large batches: weight decay and the trust ratio on kernels
  only, the usual exclusion of biases and BN."""
  def mask(params):
    return jax.tree_util.tree_map_with_path(_is_lars_adapted, params)

  return optax.lars(schedule, weight_decay=weight_decay,
                    weight_decay_mask=mask, trust_ratio_mask=mask,
                    momentum=momentum)


# config.optimizer -> (schedule, *, weight_decay, momentum) -> optimizer.
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": sgd, "lars": lars}


def create_optimizer(name: str, schedule: optax.Schedule, *,
                     weight_decay: float, momentum: float
                     ) -> optax.GradientTransformation:
  """The optimizer ``name`` (a key of OPTIMIZERS) on ``schedule``."""
  if name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {name!r}; choose one of "
                     f"{tuple(OPTIMIZERS)}.")
  return OPTIMIZERS[name](schedule, weight_decay=weight_decay,
                          momentum=momentum)
