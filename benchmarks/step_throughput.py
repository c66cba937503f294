"""Train-step throughput on synthetic data: images/s, step time, FLOPs, MFU.

  python -m benchmarks.step_throughput --config=configs/simo.py:imagenet_r50 \
      [--config.FIELD=VALUE ...] [--supervised] [--steps=20] [--warmup=3]

Runs the real jitted step of the config's method (SiMo or MoCo v2: EMA, key
and query forwards, backward, SGD, queue) over every local device on random
uint8 views that already sit on the devices, so the input pipeline is out of
the picture. ``--supervised`` times the same backbone and optimizer with a
linear classifier and cross-entropy on one view: the baseline SiMo's cost is
measured against. FLOPs per image come from XLA's cost analysis of the
compiled step; model FLOPs utilisation (MFU) is printed when the device's
peak is known. The last line is one JSON object.

Imports no TensorFlow, tensorflow-datasets or clu (the core, and the
program's TF-free ``cli`` and ``performance``), so it runs on an accelerator
host that has only jax, flax, optax and ml_collections (absl and etils come
with them).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
from absl import flags
from ml_collections import config_flags

from benchmarks import supervised
from eqco_jax.core import config as config_lib
from eqco_jax.core import sharding
from eqco_jax.core.training import builders
from eqco_jax.data import catalog
from eqco_jax.program.commands import cli
from eqco_jax.program.run import performance

NUM_CLASSES = 1000
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def planned_memory_gib(memory) -> float | None:
  """Arguments + outputs - donated + temporaries of a compiled program's
  ``memory_analysis()``, in GiB (the larger of that and the backend's own
  peak, where it reports one)."""
  if memory is None:
    return None
  planned = (memory.argument_size_in_bytes + memory.output_size_in_bytes
             - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  return max(planned, getattr(memory, "peak_memory_in_bytes", 0)) / 2**30


def define_flags(flag_values: flags.FlagValues) -> None:
  """The benchmark's flags, on ``flag_values``."""
  define = dict(flag_values=flag_values)
  config_flags.DEFINE_config_file(
      "config", os.path.join(ROOT, "configs", "simo.py:imagenet_r50"),
      "The recipe whose step is timed: FILE.py[:VARIANT].", lock_config=True,
      **define)
  flags.DEFINE_bool("supervised", False, "Time the supervised baseline on "
                    "the config's backbone instead.", **define)
  flags.DEFINE_integer("steps", 20, "Timed steps.", **define)
  flags.DEFINE_integer("warmup", 3, "Untimed steps.", **define)


def parse_args(argv: list[str]) -> flags.FlagValues:
  """``argv`` as the command line would give it, in flags of their own."""
  return cli.parse(define_flags, argv)


def benchmark(args: flags.FlagValues) -> dict:
  """Compiles and times the step; returns the figures."""
  c = args.config
  mesh = sharding.make_mesh()
  config_lib.validate(c, mesh.devices.size)
  run = builders.build_pretraining(c, steps_per_epoch=100)
  mean, std = catalog.normalisation(c)
  shape = (c.batch_size, c.image_size, c.image_size, 3)
  make_views = jax.jit(
      lambda key: jax.random.randint(key, shape, 0, 256, jnp.int32).astype(
          jnp.uint8), out_shardings=sharding.batch_sharding(mesh))
  if args.supervised:
    state, step = supervised.state_and_step(
        run, mesh, num_classes=NUM_CLASSES, mean=mean, std=std)
    make_labels = jax.jit(
        lambda key: jax.random.randint(key, shape[:1], 0, NUM_CLASSES),
        out_shardings=sharding.batch_sharding(mesh))
    batch = {"image": make_views(jax.random.key(1)),
             "label": make_labels(jax.random.key(2))}
  else:
    state = run.initial_state(mesh)
    step = run.jit_train_step(mesh, run.preprocess(
        mean=mean, std=std))
    batch = {"view1": make_views(jax.random.key(1)),
             "view2": make_views(jax.random.key(2))}

  compiled = step.lower(state, batch).compile()
  flops_per_device = performance.flops_per_device(compiled)

  for _ in range(args.warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / args.steps

  devices = mesh.devices.size
  flops_per_image = flops_per_device * devices / c.batch_size
  peak = performance.peak_flops(jax.devices()[0])
  memory = compiled.memory_analysis()
  return {
      "method": "supervised" if args.supervised else c.method,
      "symmetric": c.symmetric, "on_device_augment": c.augment.on_device,
      "model": c.model,
      "width": c.width, "batch_size": c.batch_size,
      "image_size": c.image_size, "dtype": c.dtype, "remat": c.remat,
      "devices": devices, "device_kind": jax.devices()[0].device_kind,
      "jax_version": jax.__version__,
      "step_time_s": seconds,
      "images_per_sec": c.batch_size / seconds,
      "images_per_sec_per_device": c.batch_size / seconds / devices,
      "gflops_per_image": flops_per_image / 1e9,
      "mfu": (flops_per_device / seconds / peak) if peak else None,
      # XLA's plan for one step on one device: its arguments, outputs (less
      # the donated ones) and temporaries (some backends report a smaller
      # "peak" of their own).
      "peak_memory_gib": planned_memory_gib(memory),
      "final_loss": float(metrics["loss"]),
  }


def main(args: flags.FlagValues) -> None:
  print(json.dumps(benchmark(args)))


if __name__ == "__main__":
  cli.run(main, define_flags)
