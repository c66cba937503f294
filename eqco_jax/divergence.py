"""Stopping a diverging run before anything non-finite is saved.

The loop asks :func:`first_non_finite` about the metrics of the steps since
its last check at every log step and before every checkpoint, and
:func:`state_is_finite` about the train state before every checkpoint. A
finding stops the run with :class:`Diverged`, one sentence naming the step
and the metric. No non-finite state reaches a checkpoint, so the newest
checkpoint on disk is the newest finite one and no later save rotates it out.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eqco_jax.errors import UserError

WATCHED = ("loss", "grad_norm")


class Diverged(UserError):
  """The loss, the gradient norm or the train state stopped being finite."""


def first_non_finite(metrics: Sequence[dict[str, jax.Array]],
                     first_step: int) -> tuple[int, str, float] | None:
  """``(step, metric, value)`` of the earliest non-finite watched metric.

  ``metrics[i]`` holds the metrics of step ``first_step + i``. One
  device-to-host copy per watched metric.
  """
  names = [n for n in WATCHED if metrics and n in metrics[0]]
  if not names:
    return None
  values = jax.device_get({n: jnp.stack([m[n] for m in metrics])
                           for n in names})
  for offset in range(len(metrics)):
    for name in names:
      value = float(np.asarray(values[name][offset]))
      if not math.isfinite(value):
        return first_step + offset, name, value
  return None


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def state_is_finite(state: Any) -> bool:
  """Whether every floating-point array of ``state`` is finite."""
  return bool(_all_finite(state))


def message(step: int, what: str, newest_checkpoint: int | None,
            directory: str) -> str:
  """The one sentence a diverged run stops with."""
  kept = (f"the newest checkpoint, step {newest_checkpoint} in {directory}, "
          "is finite" if newest_checkpoint is not None
          else "no checkpoint was saved")
  return (f"training diverged at step {step}: {what}; nothing non-finite "
          f"was saved and {kept}; lower base_learning_rate (or raise "
          "warmup_steps) and start again in a new --workdir.")
