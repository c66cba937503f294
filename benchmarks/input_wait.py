"""How honest ``data_wait_fraction`` is: the share of time the devices wait
for the input, as the training loop measures it, against the truth.

  python -m benchmarks.input_wait [--config=configs/quickstart.py]
      [--config.FIELD=VALUE ...] [--steps=30] [--slowdowns=0,1.5,3]

Runs the config's real jitted train step on device-resident synthetic views,
paced as the training loop paces it (``eqco_jax.program.run.pacing``), with
an input that takes ``slowdown`` x the step's own time to hand out each
batch (0: 40% of a step, shorter than the queued steps: the devices never
wait, though the host does). The truth is the share of the wall time the
devices cannot have been busy, ``1 - device time / wall time``, the device
time per step taken from runs with an instant input just before and just
after each case (averaged: a shared machine's speed drifts); the loop's
figure is the pacer's. ``host_fetch_share`` is what the figure read before it was the
pacer's: the host's time in ``next(batches)``. The last line is one JSON
object.
"""

from __future__ import annotations

import json
import os
import time
from typing import Iterator

import jax
import jax.numpy as jnp
from absl import flags
from ml_collections import config_flags

from eqco_jax.core import sharding
from eqco_jax.core.training import builders
from eqco_jax.data import catalog
from eqco_jax.program.commands import cli
from eqco_jax.program.run import pacing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def define_flags(flag_values: flags.FlagValues) -> None:
  """The benchmark's flags, on ``flag_values``."""
  define = dict(flag_values=flag_values)
  config_flags.DEFINE_config_file(
      "config", os.path.join(ROOT, "configs", "quickstart.py"),
      "The recipe whose step is paced: FILE.py[:VARIANT].", lock_config=True,
      **define)
  flags.DEFINE_integer("steps", 30, "Timed steps of each case.", **define)
  flags.DEFINE_list("slowdowns", ["0", "1.5", "3"], "Seconds between "
                    "batches, in step times (0: no wait).", **define)


def _input(batch: dict, fetch: float) -> Iterator[dict]:
  """``batch`` again and again, each after ``fetch`` seconds."""
  while True:
    time.sleep(fetch)
    yield batch


def _paced(step, state, batches: Iterator[dict], steps: int
           ) -> tuple[float, float, object]:
  """``(wall seconds, seconds the devices waited for input, state)`` of
  ``steps`` paced steps."""
  pacer = pacing.Pacer()
  start = time.perf_counter()
  for number, batch in zip(range(1, steps + 1), pacer.fetching(batches)):
    state, metrics = step(state, batch)
    pacer.dispatched(number, metrics)
  pacer.close()
  return time.perf_counter() - start, pacer.starved_seconds, state


def main(args: flags.FlagValues) -> None:
  config = args.config
  mesh = sharding.make_mesh()
  run = builders.build_pretraining(config, steps_per_epoch=100)
  mean, std = catalog.normalisation(config)
  step = run.jit_train_step(mesh, run.preprocess(mean=mean, std=std))
  shape = (config.batch_size, config.image_size, config.image_size, 3)
  views = jax.jit(lambda key: jax.random.randint(key, shape, 0, 256).astype(
      jnp.uint8), out_shardings=sharding.batch_sharding(mesh))
  batch = {"view1": views(jax.random.key(1)),
           "view2": views(jax.random.key(2))}
  state = run.initial_state(mesh)
  step = step.lower(state, batch).compile()
  _, _, state = _paced(step, state, _input(batch, 0), 5)  # warm up

  def device_seconds(state):
    """Seconds per step with nothing to wait for (the devices' own pace)."""
    wall, _, state = _paced(step, state, _input(batch, 0), args.steps)
    return wall / args.steps, state

  cases, device_times = [], []
  for slowdown in map(float, args.slowdowns):
    # The devices' pace just before and just after each case, averaged: a
    # shared machine's speed drifts between moments.
    before, state = device_seconds(state)
    # No slowdown: the host still spends 40% of a step in each fetch, while
    # the devices run the steps queued before.
    fetch = slowdown * before if slowdown else 0.4 * before
    wall, starved, state = _paced(step, state, _input(batch, fetch),
                                  args.steps)
    after, state = device_seconds(state)
    device = (before + after) / 2
    device_times.append(device)
    cases.append({
        "slowdown": slowdown, "step_seconds": round(wall / args.steps, 4),
        "device_step_seconds": [round(before, 4), round(after, 4)],
        "truth": round(max(0.0, 1 - device * args.steps / wall), 3),
        "data_wait_fraction": round(starved / wall, 3),
        "host_fetch_share": round(fetch * args.steps / wall, 3)})
    print(json.dumps(cases[-1]), flush=True)
  device = sum(device_times) / len(device_times)
  print(json.dumps({"device_step_seconds": round(device, 4),
                    "devices": mesh.devices.size, "cases": cases}))


if __name__ == "__main__":
  cli.run(main, define_flags)
