"""Learning-rate schedule and optimizer of the pretraining recipes (optax)."""

from __future__ import annotations

import jax
import ml_collections
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


def create_optimizer(
    config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
  """SGD (PyTorch semantics) or LARS, as ``config.optimizer`` says.

  SGD: ``g + wd * p`` then heavy-ball momentum then ``-lr``, weight decay on
  every parameter as in the official code. LARS (large batches): weight decay
  and the trust ratio on kernels only, the usual exclusion of biases and BN.
  """
  if config.optimizer == "sgd":
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(schedule, momentum=config.sgd_momentum))
  if config.optimizer == "lars":
    def mask(params):
      return jax.tree_util.tree_map_with_path(_is_lars_adapted, params)

    return optax.lars(
        schedule, weight_decay=config.weight_decay, weight_decay_mask=mask,
        trust_ratio_mask=mask, momentum=config.sgd_momentum)
  raise ValueError(
      f"optimizer={config.optimizer!r} is not known; use 'sgd' or 'lars'.")
