"""Whether a run fits its devices' memory, said before it starts.

After the train step is compiled, XLA's plan for one step on one device
(arguments, outputs less the donated ones, and temporaries:
``memory_analysis()``) is held against the device's memory: an accelerator's
own (``memory_stats()['bytes_limit']``), or on a CPU the host's memory
shared by its devices. A step that does not fit stops with one sentence
naming what it needs, what the device has and the fields to lower, instead
of an out-of-memory error (or the kernel's kill) minutes into the run.
The evaluation passes are checked before that, from their batches alone: a
batch of ``eval_batch_size`` images, as float32 on its devices, that does
not fit is refused before anything is built.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections

from eqco_jax.core.errors import UserError

# The part of a device's memory a step may plan to use: the rest is for the
# runtime, fragmentation and what the program holds beside the step.
USABLE = 0.9
_GB = 1e9


def device_memory(device: jax.Device) -> int | None:
  """Bytes of memory one ``device`` has for the program (None: unknown)."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if device.platform != "cpu":
    return None
  try:  # the host's memory, shared by this process's CPU devices
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None
  return total // max(1, jax.local_device_count())


def planned_bytes(compiled: Any) -> int | None:
  """XLA's plan for one call of ``compiled`` on one device: arguments plus
  outputs less the donated ones plus temporaries (None: not reported)."""
  memory = compiled.memory_analysis()
  if memory is None:
    return None
  return int(memory.argument_size_in_bytes + memory.output_size_in_bytes
             - memory.alias_size_in_bytes + memory.temp_size_in_bytes)


def _where(device: jax.Device) -> str:
  if device.platform == "cpu":
    return "this host's memory (shared by its CPU devices)"
  return f"each {device.device_kind}"


def check_step(compiled: Any, config: ml_collections.ConfigDict,
               device: jax.Device) -> None:
  """Raises UserError when the compiled train step's plan does not fit
  ``device``'s memory."""
  needed, have = planned_bytes(compiled), device_memory(device)
  if needed is None or have is None or needed <= USABLE * have:
    return
  raise UserError(
      f"the train step needs about {needed / _GB:.1f} GB on each device "
      f"(XLA's plan) and {_where(device)} gives {have / _GB:.1f} GB; lower "
      f"config.batch_size ({config.batch_size}), config.image_size "
      f"({config.image_size}) or config.model ({config.model}), or set "
      "config.remat=True (the README's recipes list what fits which "
      "hardware).")


def check_evaluation(eval_batch_size: int, image_size: int, num_devices: int,
                     device: jax.Device) -> None:
  """Raises UserError when one device's share of an evaluation batch, as
  the float32 images the backbone reads, does not fit its memory (a lower
  bound of what the pass needs).

  Args:
    num_devices: the devices the batch is split between (all processes').
    device: one of this process's devices (another's has no memory stats).
  """
  have = device_memory(device)
  size = image_size
  needed = -(-eval_batch_size // num_devices) * size * size * 3 * 4
  if have is None or needed <= USABLE * have:
    return
  raise UserError(
      f"an evaluation batch of config.eval_batch_size={eval_batch_size}"
      f" images of {size}x{size} needs at least {needed / _GB:.1f} GB on each"
      f" of {num_devices} devices and {_where(device)} gives "
      f"{have / _GB:.1f} GB; lower config.eval_batch_size (256 fits most "
      "accelerators at 224x224).")
