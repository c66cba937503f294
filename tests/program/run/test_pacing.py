"""eqco_jax.program.run.pacing: the host keeps at most two steps in flight,
and the devices' wait for input is counted where the input is slow and not
where the devices are."""

import time

import jax
import jax.numpy as jnp
import numpy as np

from eqco_jax.program.run import pacing


def _step(size: int):
  """A jitted step of a state and a batch that keeps the device busy (a
  ``size`` x ``size`` matmul); each step needs the state of the one before,
  as training's do."""
  weights = jnp.full((size, size), 1.0 / size)
  return jax.jit(lambda state, batch: state @ weights + batch)


def _step_seconds(step, size: int) -> float:
  state = step(jnp.zeros((size, size)), 0.0).block_until_ready()
  start = time.perf_counter()
  for _ in range(5):
    state = step(state, 0.0)
  state.block_until_ready()
  return (time.perf_counter() - start) / 5


def _batches(delay: float):
  while True:
    time.sleep(delay)
    yield 1.0


def _run(pacer: pacing.Pacer, step, batches, steps: int, size: int
         ) -> list:
  outputs = [jnp.zeros((size, size))]
  for number, batch in zip(range(1, steps + 1), pacer.fetching(batches)):
    outputs.append(step(outputs[-1], batch))
    pacer.dispatched(number, outputs[-1])
    # No more than two dispatched steps are unfinished.
    assert all(o.is_ready() for o in outputs[:-pacer.steps_in_flight])
  pacer.close()
  return outputs


def test_the_host_runs_at_most_two_steps_ahead():
  pacer = pacing.Pacer()
  outputs = _run(pacer, _step(600), _batches(0.0), steps=8, size=600)
  assert pacer.steps_in_flight == 2
  np.testing.assert_allclose(outputs[-1], 8.0, rtol=1e-5)


def test_devices_that_wait_for_no_batch_are_not_counted_as_waiting():
  """The host spends 40% of its time fetching batches, while the devices
  still run the steps queued before: they never wait."""
  step = _step(1200)
  seconds = _step_seconds(step, 1200)
  pacer = pacing.Pacer()
  start = time.perf_counter()
  _run(pacer, step, _batches(0.4 * seconds), steps=12, size=1200)
  assert pacer.starved_seconds < 0.05 * (time.perf_counter() - start)


def test_devices_that_wait_for_a_slow_input_are_counted():
  pacer = pacing.Pacer()
  start = time.perf_counter()
  _run(pacer, _step(8), _batches(0.05), steps=10, size=8)
  wall = time.perf_counter() - start
  # Each step after the first waited about 0.05 s for its batch, the device
  # idle: most of the wall time.
  assert pacer.starved_seconds > 0.6 * 9 * 0.05 and (
      pacer.starved_seconds < wall)
