"""What the compiled train step sends between devices: collectives and bytes.

  python -m benchmarks.collectives --config=configs/simo.py:imagenet_r50 \\
      --config.batch_size=64 [--config.FIELD=VALUE ...] [--devices=8]

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
from ml_collections import config_flags

from eqco_jax.program.commands import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def define_flags(flag_values: flags.FlagValues) -> None:
  """The command's flags, on ``flag_values``."""
  define = dict(flag_values=flag_values)
  config_flags.DEFINE_config_file(
      "config", os.path.join(ROOT, "configs", "simo.py:imagenet_r50"),
      "The recipe whose step is compiled: FILE.py[:VARIANT].",
      lock_config=True, **define)
  flags.DEFINE_integer("devices", 8, "Host CPU devices of the mesh.",
                       **define)


def parse_args(argv: list[str]) -> flags.FlagValues:
  """``argv`` as the command line would give it, in flags of their own."""
  return cli.parse(define_flags, argv)


def measure(args: flags.FlagValues) -> dict:
  """Compiles the step on the mesh of every device; returns the figures."""
  import jax  # after XLA_FLAGS
  import jax.numpy as jnp

  from eqco_jax.core import sharding
  from eqco_jax.core.training import builders

  # float32: the bytes a collective moves are then those of the parameters.
  config = args.config.copy_and_resolve_references()
  config.dtype = "float32"
  mesh = sharding.make_mesh()
  run = builders.build_pretraining(config, steps_per_epoch=100)
  replicated = sharding.replicated(mesh)
  state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      jax.eval_shape(lambda: run.initial_state(mesh)))
  size = config.image_size
  view = jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.uint8,
                              sharding=sharding.batch_sharding(mesh))
  step = run.jit_train_step(mesh, run.preprocess(mean=(0.5,) * 3,
                                                std=(0.5,) * 3))
  hlo = step.lower(state, {"view1": view, "view2": view}).compile().as_text()
  found = collectives(hlo)
  param_bytes = sum(x.size * 4 for x in jax.tree.leaves(state.params))
  total = sum(size for _, size in found)
  return {
      "method": config.method, "symmetric": config.symmetric,
      "model": config.model, "image_size": size,
      "batch_size": config.batch_size,
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
  cli.run(main, define_flags)
