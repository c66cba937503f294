"""What the compiled train step sends between devices: collectives and bytes.

  python -m benchmarks.collectives --method=simo --model=resnet50 \\
      --image_size=224 --batch_size=64 [--devices=8]

Compiles (never runs) the real SiMo / MoCo v2 step for a mesh of ``--devices``
host CPU devices and reads its optimized HLO: every all-reduce, all-gather,
all-to-all, collective-permute and reduce-scatter, and the bytes each one
moves (its result). Data parallelism needs one gradient all-reduce (the
float32 parameter bytes) plus BatchNorm statistics, so ``bytes_per_param_byte``
should stay near 1. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re

COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute",
               "reduce-scatter")
_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "u64": 8,
          "s32": 4, "u32": 4, "s16": 2, "u16": 2, "s8": 1, "u8": 1,
          "pred": 1}
_INSTRUCTION = re.compile(
    r"=\s*(?P<shape>.*?)\s+(?P<op>" + "|".join(COLLECTIVES) +
    r")(?:-start)?\(")
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")


def collectives(hlo_text: str) -> list[tuple[str, int]]:
  """``(op, result bytes)`` of every collective in an HLO module's text."""
  found = []
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.search(line)
    if not match:
      continue
    size = 0
    for dtype, dims in _ARRAY.findall(match.group("shape")):
      count = 1
      for d in filter(None, dims.split(",")):
        count *= int(d)
      size += _BYTES[dtype] * count
    found.append((match.group("op"), size))
  return found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--method", default="simo", choices=("simo", "mocov2"))
  p.add_argument("--model", default="resnet50")
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--batch_size", type=int, default=64, help="global batch")
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--symmetric", action="store_true")
  return p.parse_args(argv)


def measure(args: argparse.Namespace) -> dict:
  """Compiles the step on the mesh of every device; returns the figures."""
  import jax  # after XLA_FLAGS
  import jax.numpy as jnp

  from benchmarks import step_throughput
  from eqco_jax import builders
  from eqco_jax import sharding

  config = step_throughput.step_config(step_throughput.parse_args([
      f"--method={args.method}", f"--model={args.model}",
      f"--width={args.width}", f"--image_size={args.image_size}",
      f"--batch_size={args.batch_size}", "--dtype=float32",
      *(["--symmetric"] if args.symmetric else [])]))
  mesh = sharding.make_mesh()
  encoder = builders.create_encoder(config)
  tx, schedule = builders.create_optimizer(config, total_steps=100)
  replicated = sharding.replicated(mesh)
  state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      jax.eval_shape(lambda: builders.initial_state(config, encoder, tx,
                                                    mesh)))
  view = jax.ShapeDtypeStruct(
      (args.batch_size, args.image_size, args.image_size, 3), jnp.uint8,
      sharding=sharding.batch_sharding(mesh))
  step = builders.create_train_step(config, encoder, tx, schedule, mesh,
                                    mean=(0.5,) * 3, std=(0.5,) * 3)
  hlo = step.lower(state, {"view1": view, "view2": view}).compile().as_text()
  found = collectives(hlo)
  param_bytes = sum(x.size * 4 for x in jax.tree.leaves(state.params))
  total = sum(size for _, size in found)
  return {
      "method": args.method, "symmetric": args.symmetric, "model": args.model,
      "image_size": args.image_size, "batch_size": args.batch_size,
      "devices": mesh.devices.size,
      "counts": dict(collections.Counter(op for op, _ in found)),
      "largest_bytes": sorted((size for _, size in found), reverse=True)[:3],
      "collective_bytes": total, "param_bytes": param_bytes,
      "bytes_per_param_byte": total / param_bytes,
  }


if __name__ == "__main__":
  arguments = parse_args()
  os.environ["XLA_FLAGS"] = " ".join([  # the caller's flags, then the count
      os.environ.get("XLA_FLAGS", ""),
      f"--xla_force_host_platform_device_count={arguments.devices}"]).strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  print(json.dumps(measure(arguments)))
