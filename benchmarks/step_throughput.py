"""Train-step throughput on synthetic data: images/s, step time, FLOPs, MFU.

  python -m benchmarks.step_throughput --method=simo --model=resnet50 \
      --batch_size=256 --image_size=224 --dtype=bfloat16

Runs the real jitted SiMo / MoCo v2 step (EMA, key and query forwards,
backward, SGD, queue) over every local device on random uint8 views that
already sit on the devices, so the input pipeline is out of the picture.
``--method=supervised`` times the same backbone and optimizer with a linear
classifier and cross-entropy on one view: the baseline SiMo's cost is
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
import time

import jax
import jax.numpy as jnp
from absl import flags

from benchmarks import supervised
from eqco_jax.core import builders
from eqco_jax.core import config as config_lib
from eqco_jax.core import sharding
from eqco_jax.data import catalog
from eqco_jax.program import cli
from eqco_jax.program import performance

NUM_CLASSES = 1000

def planned_memory_gib(memory) -> float | None:
  """Arguments + outputs - donated + temporaries of a compiled program's
  ``memory_analysis()``, in GiB (the larger of that and the backend's own
  peak, where it reports one)."""
  if memory is None:
    return None
  planned = (memory.argument_size_in_bytes + memory.output_size_in_bytes
             - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  return max(planned, getattr(memory, "peak_memory_in_bytes", 0)) / 2**30


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The benchmark's flags, on ``flag_values``."""
  define = dict(flag_values=flag_values)
  flags.DEFINE_enum("method", "simo", ("simo", "mocov2", "supervised"),
                    "The step to time.", **define)
  flags.DEFINE_string("model", "resnet50", "A key of models.LAYOUTS.",
                      **define)
  flags.DEFINE_integer("width", 64, "First-stage width.", **define)
  flags.DEFINE_bool("small_image_stem", False, "3x3 stem, no max-pool.",
                    **define)
  flags.DEFINE_integer("batch_size", 256, "Global batch.", **define)
  flags.DEFINE_integer("image_size", 224, "Side of a view.", **define)
  flags.DEFINE_enum("dtype", "bfloat16", ("float32", "bfloat16"),
                    "Compute dtype.", **define)
  flags.DEFINE_bool("remat", False, "Rematerialise blocks.", **define)
  flags.DEFINE_integer("head_hidden_dim", 2048, "Head width.", **define)
  flags.DEFINE_integer("queue_size", 65536, "MoCo v2 (rounded down to a "
                       "multiple of the batch).", **define)
  flags.DEFINE_bool("symmetric", False, "SiMo: both views as queries.",
                    **define)
  flags.DEFINE_bool("on_device_augment", False, "Colour, blur and grayscale "
                    "on the device inside the step.", **define)
  flags.DEFINE_integer("steps", 20, "Timed steps.", **define)
  flags.DEFINE_integer("warmup", 3, "Untimed steps.", **define)


def parse_args(argv: list[str]) -> flags.FlagValues:
  """``argv`` as the command line would give it, in flags of their own."""
  return cli.parse(define_flags, argv)


def step_config(args: flags.FlagValues):
  """The pretraining config of the timed step."""
  c = config_lib.default_config()
  c.method = "simo" if args.method == "supervised" else args.method
  c.head = config_lib.METHOD_HEADS[c.method]
  c.model, c.width = args.model, args.width
  c.small_image_stem = args.small_image_stem
  c.batch_size, c.image_size = args.batch_size, args.image_size
  c.eval_batch_size = args.batch_size
  c.dtype, c.remat = args.dtype, args.remat
  c.head_hidden_dim = args.head_hidden_dim
  c.symmetric = args.symmetric
  c.augment.on_device = args.on_device_augment
  if c.method == "mocov2":
    c.eqco, c.bn_group_size = False, min(32, args.batch_size)
    c.queue_size = max(args.queue_size // args.batch_size, 1) * args.batch_size
    c.zero_init_residual = False
  return c


def benchmark(args: flags.FlagValues) -> dict:
  """Compiles and times the step; returns the figures."""
  c = step_config(args)
  mesh = sharding.make_mesh()
  config_lib.validate(c, mesh.devices.size)
  run = builders.build_pretraining(c, total_steps=10_000)
  shape = (c.batch_size, c.image_size, c.image_size, 3)
  make_views = jax.jit(
      lambda key: jax.random.randint(key, shape, 0, 256, jnp.int32).astype(
          jnp.uint8), out_shardings=sharding.batch_sharding(mesh))
  if args.method == "supervised":
    state, step = supervised.state_and_step(
        run, mesh, num_classes=NUM_CLASSES, mean=catalog.IMAGENET_MEAN,
        std=catalog.IMAGENET_STD)
    make_labels = jax.jit(
        lambda key: jax.random.randint(key, shape[:1], 0, NUM_CLASSES),
        out_shardings=sharding.batch_sharding(mesh))
    batch = {"image": make_views(jax.random.key(1)),
             "label": make_labels(jax.random.key(2))}
  else:
    state = run.initial_state(mesh)
    step = run.jit_train_step(mesh, run.preprocess(
        mean=catalog.IMAGENET_MEAN, std=catalog.IMAGENET_STD))
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
      "method": args.method, "symmetric": args.symmetric,
      "on_device_augment": args.on_device_augment, "model": c.model,
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
  define_flags()
  cli.run(main)
