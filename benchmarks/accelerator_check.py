"""The device check: every method's step on every local accelerator.

  python -m benchmarks.accelerator_check [--tiny] [--steps=20]

(``benchmarks/accelerator_check.sh`` runs this where ml_collections may only
be a wheel.) One process, one JSON line per measurement, then a table and
SiMo's images/s over the supervised step's. ResNet-50 at 224 in bfloat16,
per-device batch 256, synthetic device-resident views; ``--tiny`` is the CPU
path of the test suite (ResNet-10 of width 4 at 16x16).
"""

from __future__ import annotations

import json
import os

import jax
from absl import flags

from benchmarks import step_throughput
from eqco_jax.program.commands import cli

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "configs")
_HOST_COLOUR = "--config.augment.on_device=False"
# (label, recipe, extra flags) of each measurement, in order.
MEASUREMENTS = (
    ("supervised", "simo.py:imagenet_r50", ["--supervised", _HOST_COLOUR]),
    ("simo", "simo.py:imagenet_r50", [_HOST_COLOUR]),
    ("simo symmetric", "simo.py:imagenet_r50",
     ["--config.symmetric=True", _HOST_COLOUR]),
    ("mocov2", "mocov2.py:imagenet_r50", [_HOST_COLOUR]),
    ("simo on-device aug", "simo.py:imagenet_r50", []),
)
# The recipes as they are (ResNet-50 at 224, bfloat16), or, for --tiny, a
# width-4 ResNet-10 with the small-image stem at 16x16 in float32.
TINY = ["--config.model=resnet10", "--config.width=4",
        "--config.small_image_stem=True", "--config.image_size=16",
        "--config.dtype=float32", "--config.head_hidden_dim=64",
        "--config.queue_size=256"]


def define_flags(flag_values: flags.FlagValues) -> None:
  """The check's flags, on ``flag_values``."""
  define = dict(flag_values=flag_values)
  flags.DEFINE_bool("tiny", False, "The CPU path of the test suite.",
                    **define)
  flags.DEFINE_integer("steps", 20, "Timed steps of each measurement.",
                       **define)
  flags.DEFINE_integer("per_device_batch", None,
                       "Default: 256, or 2 with --tiny.", **define)


def table(rows: list[tuple[str, dict]]) -> str:
  """The measurements as a fixed-width table."""
  cell = lambda v, spec: "-" if v is None else format(v, spec)
  lines = [f"{'step':<20}{'images/s':>10}{'step ms':>9}{'GFLOP/img':>10}"
           f"{'MFU':>7}{'peak GiB':>9}"]
  for label, r in rows:
    lines.append(
        f"{label:<20}{r['images_per_sec']:>10.0f}"
        f"{1e3 * r['step_time_s']:>9.1f}{r['gflops_per_image']:>10.2f}"
        f"{cell(r['mfu'], '.3f'):>7}{cell(r['peak_memory_gib'], '.1f'):>9}")
  return "\n".join(lines)


def main(args: flags.FlagValues) -> None:
  per_device = args.per_device_batch or (2 if args.tiny else 256)
  devices = jax.local_device_count()
  print(json.dumps({"device_kind": jax.devices()[0].device_kind,
                    "devices": devices, "jax_version": jax.__version__}),
        flush=True)
  batch = per_device * devices
  common = [*(TINY if args.tiny else []), f"--config.batch_size={batch}",
            f"--config.eval_batch_size={batch}", f"--steps={args.steps}",
            f"--warmup={1 if args.tiny else 3}"]
  rows = []
  for label, recipe, extra in MEASUREMENTS:
    if recipe.startswith("mocov2"):  # BN per 32, or per device if fewer
      extra = [*extra, f"--config.bn_group_size={min(32, per_device)}"]
    report = step_throughput.benchmark(step_throughput.parse_args(
        [f"--config={os.path.join(_CONFIGS, recipe)}", *extra, *common]))
    print(json.dumps(report), flush=True)
    rows.append((label, report))
  rate = dict((label, r["images_per_sec"]) for label, r in rows)
  ratio = rate["simo"] / rate["supervised"]
  print(table(rows))
  print(f"SiMo / supervised images/s: {ratio:.3f} (goal >= 0.70)")
  print(json.dumps({"simo_over_supervised": ratio}))


if __name__ == "__main__":
  cli.run(main, define_flags)
