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

Imports only the core (no TensorFlow, tensorflow-datasets or clu), so it runs
on an accelerator host that has only jax, flax, optax and ml_collections.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from benchmarks import supervised
from eqco_jax import builders
from eqco_jax import config as config_lib
from eqco_jax import sharding
from eqco_jax.data import catalog

NUM_CLASSES = 1000

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets.
PEAK_BF16_FLOPS = {
    "H100": 989e12, "H200": 989e12, "GH200": 989e12, "B200": 2250e12,
    "A100": 312e12, "L4": 121e12, "A10": 125e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops(device: jax.Device) -> float | None:
  """The bf16 peak of ``device`` if its kind is in the table."""
  kind = device.device_kind
  for name, flops in PEAK_BF16_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--method", default="simo",
                 choices=("simo", "mocov2", "supervised"))
  p.add_argument("--model", default="resnet50")
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--small_image_stem", action="store_true")
  p.add_argument("--batch_size", type=int, default=256, help="global batch")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  p.add_argument("--remat", action="store_true")
  p.add_argument("--head_hidden_dim", type=int, default=2048)
  p.add_argument("--queue_size", type=int, default=65536,
                 help="MoCo v2 (rounded down to a multiple of the batch)")
  p.add_argument("--symmetric", action="store_true",
                 help="SiMo: both views as queries")
  p.add_argument("--on_device_augment", action="store_true",
                 help="colour/blur/grayscale on the device inside the step")
  p.add_argument("--steps", type=int, default=20, help="timed steps")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps")
  return p.parse_args(argv)


def step_config(args: argparse.Namespace):
  """The pretraining config of the timed step."""
  c = config_lib.default_config()
  c.method = "simo" if args.method == "supervised" else args.method
  c.head = c.method
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


def benchmark(args: argparse.Namespace) -> dict:
  """Compiles and times the step; returns the figures."""
  c = step_config(args)
  mesh = sharding.make_mesh()
  config_lib.validate(c, mesh.devices.size)
  tx, schedule = builders.create_optimizer(c, total_steps=10_000)
  shape = (c.batch_size, c.image_size, c.image_size, 3)
  make_views = jax.jit(
      lambda key: jax.random.randint(key, shape, 0, 256, jnp.int32).astype(
          jnp.uint8), out_shardings=sharding.batch_sharding(mesh))
  if args.method == "supervised":
    state, step = supervised.state_and_step(
        c, tx, mesh, num_classes=NUM_CLASSES, mean=catalog.IMAGENET_MEAN,
        std=catalog.IMAGENET_STD)
    make_labels = jax.jit(
        lambda key: jax.random.randint(key, shape[:1], 0, NUM_CLASSES),
        out_shardings=sharding.batch_sharding(mesh))
    batch = {"image": make_views(jax.random.key(1)),
             "label": make_labels(jax.random.key(2))}
  else:
    encoder = builders.create_encoder(c)
    state = builders.initial_state(c, encoder, tx, mesh)
    step = builders.create_train_step(c, encoder, tx, schedule, mesh,
                                      mean=catalog.IMAGENET_MEAN, std=catalog.IMAGENET_STD)
    batch = {"view1": make_views(jax.random.key(1)),
             "view2": make_views(jax.random.key(2))}

  compiled = step.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops_per_device = float(cost.get("flops", 0.0)) if cost else 0.0

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
  peak = peak_flops(jax.devices()[0])
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
      # XLA's plan for one step on one device: arguments, outputs and
      # temporaries at their peak.
      "peak_memory_gib": (getattr(memory, "peak_memory_in_bytes", 0) / 2**30
                          if memory is not None else None),
      "final_loss": float(metrics["loss"]),
  }


if __name__ == "__main__":
  print(json.dumps(benchmark(parse_args())))
