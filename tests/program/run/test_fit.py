"""eqco_jax.program.run.fit: a step or an evaluation batch that does not fit
its device's memory is one sentence naming what it needs, what the device
has and what to lower."""

import types

import jax
import jax.numpy as jnp
import pytest

from helpers import load_config
from eqco_jax.core.errors import UserError
from eqco_jax.program.run import fit


class _Device:
  """A device of ``limit`` bytes (None: it does not say)."""

  def __init__(self, limit, platform="gpu"):
    self.platform, self.device_kind = platform, "NVIDIA L4"
    self._limit = limit

  def memory_stats(self):
    return None if self._limit is None else {"bytes_limit": self._limit}


def _plan(gigabytes: float):
  memory = types.SimpleNamespace(
      argument_size_in_bytes=int(gigabytes * 1e9 / 2), output_size_in_bytes=0,
      alias_size_in_bytes=0, temp_size_in_bytes=int(gigabytes * 1e9 / 2))
  return types.SimpleNamespace(memory_analysis=lambda: memory)


def test_a_step_that_does_not_fit_names_what_to_lower():
  config = load_config("simo.py", "imagenet_r50")
  fit.check_step(_plan(20.0), config, _Device(24e9))  # fits
  fit.check_step(_plan(99.0), config, _Device(None))  # memory not known
  with pytest.raises(UserError) as error:
    fit.check_step(_plan(39.0), config, _Device(24e9))
  assert str(error.value) == (
      "the train step needs about 39.0 GB on each device (XLA's plan) and "
      "each NVIDIA L4 gives 24.0 GB; lower config.batch_size (256), "
      "config.image_size (224) or config.model (resnet50), or set "
      "config.remat=True (the README's recipes list what fits which "
      "hardware).")


def test_the_plan_is_xlas_memory_analysis_of_the_compiled_step():
  compiled = jax.jit(lambda x: (x @ x.T).sum(0)).lower(
      jnp.ones((256, 128))).compile()
  planned = fit.planned_bytes(compiled)
  assert planned >= 256 * 128 * 4  # its argument at least
  cpu = jax.devices()[0]
  assert fit.device_memory(cpu) > 0  # the host's share


def test_an_evaluation_batch_that_cannot_fit_is_refused_before_training():
  device = _Device(16e9)
  fit.check_evaluation(256, 224, 8, device)
  with pytest.raises(UserError, match=r"^an evaluation batch of "
                     r"config.eval_batch_size=1000000000 images of 32x32 "
                     r"needs at least 1536.0 GB on each of 8 devices and "
                     r"each NVIDIA L4 gives 16.0 GB; lower "
                     r"config.eval_batch_size"):
    fit.check_evaluation(10**9, 32, 8, device)
