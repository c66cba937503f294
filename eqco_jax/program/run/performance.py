"""Where a run's time goes: step time, the share of it spent waiting for the
input, images per second per device, model FLOPs utilisation, and a trace of
a few steps.

Every log interval (after the first, which compiles) gets
``step_time`` (seconds per step), ``data_wait_fraction`` (the share of the
interval's wall time the devices sat idle for want of a batch, measured by
``pacing.Pacer``: near 0, the accelerators are the limit; above, the
input),
``images_per_sec``, ``images_per_sec_per_device`` and, where the device's
peak bf16 FLOP/s is in :data:`PEAK_BF16_FLOPS`, ``mfu``: the compiled step's
FLOPs (XLA's cost analysis, read once) per second over that peak.

``config.profile_steps = N`` traces N steps after the compilation with
``jax.profiler`` into the workdir, in the layout TensorBoard's profile
plugin reads: ``plugins/profile/<run>/<host>.xplane.pb`` (written locally,
then copied through the storage layer, so a ``gs://`` workdir gets it too).
"""

from __future__ import annotations

import re
import tempfile
import time
from typing import Any

import jax
import ml_collections
from absl import logging

from eqco_jax.program.files import storage
from eqco_jax.program.files.workdir import Workdir
from eqco_jax.program.run.pacing import Pacer

# Dense (no sparsity) bf16 peak FLOP/s per device, from the vendors' data
# sheets, by the device's whole ``device_kind`` (a regular expression, case
# ignored); a kind not here has no ``mfu``.
PEAK_BF16_FLOPS = (
    (r"NVIDIA H100 (80GB HBM3|SXM5?.*)", 989e12),  # SXM
    (r"NVIDIA H100 PCIe", 756e12),
    (r"NVIDIA H100 NVL", 835e12),
    (r"NVIDIA (GH200.*|H200)", 989e12),
    (r"NVIDIA H200 NVL", 835e12),
    (r"NVIDIA B200", 2250e12),
    (r"NVIDIA A100[- ].*", 312e12),  # 40 and 80 GB, SXM and PCIe
    (r"NVIDIA L40S", 362e12),
    (r"NVIDIA L40", 181e12),
    (r"NVIDIA L4", 121e12),
    (r"NVIDIA A10", 125e12),
    (r"TPU v4", 275e12),
    (r"TPU v5 ?(lite|e)", 197e12),
    (r"TPU v5p?", 459e12),
    (r"TPU v6 ?(lite|e)", 918e12),
)


def peak_flops(device: jax.Device) -> float | None:
  """The bf16 peak FLOP/s of ``device`` if its kind is in the table."""
  kind = device.device_kind.strip()
  return next((flops for pattern, flops in PEAK_BF16_FLOPS
               if re.fullmatch(pattern, kind, re.IGNORECASE)), None)


# Below this many examples per device a step's matmuls and convolutions are
# too small to keep an accelerator busy.
MIN_PER_DEVICE_BATCH = 8
# The large-batch recipe of each dataset that has one.
LARGE_BATCH_RECIPES = {
    "imagenet2012": "configs/{method}.py:imagenet_r50_large (batch 4096, "
                    "LARS)"}


def per_device_batch_advice(config: ml_collections.ConfigDict,
                            num_devices: int) -> str | None:
  """One sentence when the config's per-device batch is below
  ``MIN_PER_DEVICE_BATCH``, naming the dataset's large-batch recipe where
  it has one; else None."""
  per_device = config.batch_size // num_devices
  if per_device >= MIN_PER_DEVICE_BATCH:
    return None
  recipe = LARGE_BATCH_RECIPES.get(config.dataset)
  instead = f"{recipe.format(method=config.method)} or " if recipe else ""
  return (f"the per-device batch is {per_device} (batch_size="
          f"{config.batch_size} over {num_devices} devices), too small to "
          f"keep an accelerator busy: use {instead}a batch_size of at least "
          f"{MIN_PER_DEVICE_BATCH * num_devices} with the learning-rate rule "
          "of the README's recipes per hardware.")


def flops_per_device(compiled: Any) -> float:
  """FLOPs of one call of a compiled program on one device (XLA's cost
  analysis; 0 when the backend gives none)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


class Throughput:
  """Throughput over whole log intervals after the first (which compiles),
  not counting evaluation.

  Args:
    batch_size: global batch of a step.
    num_devices: devices of the mesh.
    step_flops: FLOPs of one step on one device (0: unknown).
    peak: the device's peak FLOP/s (None: unknown, no ``mfu``).
    pacer: the loop's pacer, which measures the devices' wait for input.
    steps: steps already measured (by the run before a restart).
    seconds: their wall time.
  """

  def __init__(self, *, batch_size: int, num_devices: int, step_flops: float,
               peak: float | None, pacer: Pacer, steps: int = 0,
               seconds: float = 0.0):
    self.batch_size = batch_size
    self.num_devices = num_devices
    self.step_flops = step_flops
    self.peak = peak
    self.pacer = pacer
    self.steps, self.seconds = steps, seconds
    self._start: tuple[int, float, float] | None = None

  def interval(self, step: int) -> dict[str, float]:
    """The figures of the interval that ends at ``step`` (none for the
    first, or the first after :meth:`pause`)."""
    now, figures = time.perf_counter(), {}
    if self._start is not None:
      first, began, waited = self._start
      steps, seconds = step - first, now - began
      self.steps, self.seconds = self.steps + steps, self.seconds + seconds
      rate = steps * self.batch_size / seconds
      figures = {
          "step_time": seconds / steps,
          "data_wait_fraction": (self.pacer.starved_seconds - waited)
                                / seconds,
          "images_per_sec": rate,
          "images_per_sec_per_device": rate / self.num_devices}
      if self.peak and self.step_flops:
        figures["mfu"] = self.step_flops * steps / seconds / self.peak
    self._start = (step, now, self.pacer.starved_seconds)
    return figures

  def pause(self, step: int) -> None:
    """Time from here on counts again; an interval begun before ``step`` is
    dropped."""
    if self._start is not None:
      self._start = ((step, time.perf_counter(), self.pacer.starved_seconds)
                     if self._start[0] == step else None)

  def mean(self) -> float | None:
    """Images per second over every measured interval."""
    return images_per_sec(self.batch_size, self.steps, self.seconds)


def images_per_sec(batch_size: int, steps: int, seconds: float
                   ) -> float | None:
  """Images per second of ``steps`` steps in ``seconds`` (None if none were
  timed)."""
  return steps * batch_size / seconds if seconds else None


class StepProfile:
  """Traces steps ``first + 1 .. first + num_steps`` of a run into
  ``workdir/plugins/profile/<run>/`` (none when ``num_steps`` is 0)."""

  def __init__(self, workdir: Workdir, *, first: int, num_steps: int):
    self.workdir = workdir
    self.first, self.last = first, first + num_steps
    self._local: str | None = None

  def before_step(self, step: int) -> None:
    """Call before running step ``step + 1``."""
    if step == self.first and self.last > self.first:
      self._local = tempfile.mkdtemp(prefix="eqco_jax_profile_")
      jax.profiler.start_trace(self._local)

  def after_step(self, step: int, state: Any) -> None:
    """Call after step ``step``, with the state it made."""
    if self._local is None or step != self.last:
      return
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    local = storage.path(self._local) / "plugins" / "profile"
    for trace in local.glob("*/*"):
      target = self.workdir.profiles / trace.relative_to(local)
      target.parent.mkdir(parents=True, exist_ok=True)
      storage.write_bytes_atomic(target, trace.read_bytes())
    logging.info("Traced steps %d to %d into %s (TensorBoard's profile "
                 "plugin).", self.first + 1, self.last, self.workdir.profiles)
    self._local = None
