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

import collections
import json
import os
import re

from absl import flags

from eqco_jax.program import cli

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


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on ``flag_values``."""
  define = dict(flag_values=flag_values)
  flags.DEFINE_enum("method", "simo", ("simo", "mocov2"), "The step.",
                    **define)
  flags.DEFINE_string("model", "resnet50", "A key of models.LAYOUTS.",
                      **define)
  flags.DEFINE_integer("width", 64, "First-stage width.", **define)
  flags.DEFINE_integer("image_size", 224, "Side of a view.", **define)
  flags.DEFINE_integer("batch_size", 64, "Global batch.", **define)
  flags.DEFINE_integer("devices", 8, "Host CPU devices of the mesh.",
                       **define)
  flags.DEFINE_bool("symmetric", False, "SiMo: both views as queries.",
                    **define)


def parse_args(argv: list[str]) -> flags.FlagValues:
  """``argv`` as the command line would give it, in flags of their own."""
  return cli.parse(define_flags, argv)


def measure(args: flags.FlagValues) -> dict:
  """Compiles the step on the mesh of every device; returns the figures."""
  import jax  # after XLA_FLAGS
  import jax.numpy as jnp

  from benchmarks import step_throughput
  from eqco_jax.core import builders
  from eqco_jax.core import sharding

  config = step_throughput.step_config(step_throughput.parse_args([
      f"--method={args.method}", f"--model={args.model}",
      f"--width={args.width}", f"--image_size={args.image_size}",
      f"--batch_size={args.batch_size}", "--dtype=float32",
      *(["--symmetric"] if args.symmetric else [])]))
  mesh = sharding.make_mesh()
  run = builders.build_pretraining(config, total_steps=100)
  replicated = sharding.replicated(mesh)
  state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      jax.eval_shape(lambda: run.initial_state(mesh)))
  view = jax.ShapeDtypeStruct(
      (args.batch_size, args.image_size, args.image_size, 3), jnp.uint8,
      sharding=sharding.batch_sharding(mesh))
  step = run.jit_train_step(mesh, run.preprocess(mean=(0.5,) * 3,
                                                std=(0.5,) * 3))
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


def main(args: flags.FlagValues) -> None:
  os.environ["XLA_FLAGS"] = " ".join([  # the caller's flags, then the count
      os.environ.get("XLA_FLAGS", ""),
      f"--xla_force_host_platform_device_count={args.devices}"]).strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  print(json.dumps(measure(args)))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
