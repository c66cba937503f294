"""What the pretraining loop keeps besides the state: each log interval's
metrics in ``progress.json`` (``run_files.Progress``), the summary a finished
run writes and prints, and the hyperparameters TensorBoard shows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from eqco_jax.core import run_identity
from eqco_jax.core.training import builders
from eqco_jax.core.types import Metrics
from eqco_jax.program.files.run_files import BackgroundWrites, Progress
from eqco_jax.program.files.run_files import SkippedRecords
from eqco_jax.program.files.workdir import PROGRESS, Workdir
from eqco_jax.program.run import performance


def mean_metrics(metrics: list[Metrics]) -> dict[str, float]:
  """Host-side mean of per-step metric dicts (one device-to-host copy)."""
  stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *metrics))
  return {name: float(np.mean(values)) for name, values in stacked.items()}


def record_interval(writes: BackgroundWrites | None, progress: Progress,
                    step: int, metrics: dict[str, float], *, began: int,
                    timed_steps: int, timed_seconds: float) -> Progress:
  """``progress`` after the log interval of steps ``began + 1 .. step``,
  handed to ``writes`` (process 0's; None elsewhere) for ``progress.json``.
  Only an interval that began at step 0 is the run's first (a run whose
  progress.json was lost does not know its first)."""
  first = progress.first_interval or (metrics if began == 0 else None)
  progress = dataclasses.replace(
      progress, step=step, last_interval=metrics, first_interval=first,
      timed_steps=timed_steps, timed_seconds=timed_seconds,
      final_evaluation={})
  if writes is not None:
    writes.put(PROGRESS, progress.to_json())
  return progress


def log_skipped(skipped: SkippedRecords, *, began: int, step: int) -> None:
  """One log line (none where there are none) for the unreadable records
  this process left out of the batches of steps ``began + 1 .. step``: how
  many, and the first few ids."""
  records = [record for s, step_records in sorted(skipped.by_step.items())
             if began < s <= step for record in step_records]
  if not records:
    return
  shown = ", ".join(records[:_SHOWN])
  if len(records) > _SHOWN:
    shown += f" and {len(records) - _SHOWN} more"
  logging.warning("Skipped %d unreadable image(s) in the batches of steps "
                  "%d-%d: %s; other images of their batches took their "
                  "places.", len(records), began + 1, step, shown)


_SHOWN = 3  # record ids named in a log line


def evaluated_backbones(config: ml_collections.ConfigDict) -> set[str]:
  """The backbones the final evaluation of ``config`` evaluates."""
  if not config.final_eval:
    return set()
  return {"pretrained", "baseline"} if config.final_eval_baseline else {
      "pretrained"}


def summary(config: ml_collections.ConfigDict, progress: Progress, *,
            total_steps: int, num_devices: int, skipped: SkippedRecords
            ) -> dict[str, Any]:
  """The run's summary, from ``progress`` (with the final evaluation's
  finished parts) and the rest of what the run knows."""
  trained = ((progress.last_interval or {}) if progress.step == total_steps
             else {})
  alpha = builders.loss_alpha(config)
  result = {
      "method": config.method, "dataset": config.dataset,
      "model": config.model, "eqco": alpha is not None, "alpha": alpha,
      "num_negatives": builders.negatives_per_query(config),
      "steps": total_steps, "batch_size": config.batch_size,
      "num_devices": num_devices,
      # None only where progress.json was lost (see Workdir.read_run_file).
      "final_loss": trained.get("loss"),
      # Mean gradient norm of the first log interval (EqCo keeps it about
      # the same whatever K; plain InfoNCE's shrinks at small K).
      "initial_grad_norm": (progress.first_interval or {}).get("grad_norm"),
      "images_per_sec": performance.images_per_sec(config.batch_size,
                                                   progress.timed_steps,
                                                   progress.timed_seconds),
      # Unreadable images left out of their batches (see data.unreadable).
      "skipped_records": _all_processes_total(skipped.count(total_steps)),
  }
  for name, results in progress.final_evaluation.items():
    prefix = "" if name == "pretrained" else f"{name}_"
    result.update({prefix + k: v for k, v in results.items()})
  return result


def finished_summary(config: ml_collections.ConfigDict, workdir: Workdir,
                     progress: Progress, *, total_steps: int,
                     num_devices: int, skipped: SkippedRecords
                     ) -> dict[str, Any] | None:
  """The summary of a run whose training is checkpointed to its end: the
  one in the workdir, or one made from ``progress`` (and written) when its
  final evaluation is done too; None when something is left to do."""
  written = workdir.read_run_file("summary.json")
  if isinstance(written, dict):
    return written
  if progress.step != total_steps or not evaluated_backbones(config) <= set(
      progress.final_evaluation):
    return None
  result = summary(config, progress, total_steps=total_steps,
                   num_devices=num_devices, skipped=skipped)
  if jax.process_index() == 0:
    workdir.write_run_config(config)
    workdir.write_run_file("summary.json", result)
  return result


def summary_table(result: dict[str, Any]) -> str:
  """A finished run's result: its loss, throughput and skipped images, and
  each evaluated backbone's kNN top-1 and linear top-1 and top-5 (the
  README's columns)."""
  loss, rate = result["final_loss"], result["images_per_sec"]
  skipped = result.get("skipped_records") or 0
  lines = [f"{result['method']} on {result['dataset']}: {result['steps']} "
           f"steps, final loss {'unknown' if loss is None else f'{loss:.4f}'}"
           f", {rate or 0:.0f} images/s"
           + (f", {skipped} unreadable image(s) skipped" if skipped else "")]
  rows = [(name, prefix) for name, prefix in (("pretrained", ""),
                                              ("random init", "baseline_"))
          if prefix + "linear_top1" in result]
  if rows:
    lines.append(f"{'encoder':<22}{'kNN top-1':>12}{'linear top-1':>14}"
                 f"{'linear top-5':>14}")
  for name, prefix in rows:
    lines.append(f"{name:<22}{result[prefix + 'knn_top1']:>12.4f}"
                 f"{result[prefix + 'linear_top1']:>14.4f}"
                 f"{result[prefix + 'linear_top5']:>14.4f}")
  return "\n".join(lines)


def _all_processes_total(count: int) -> int:
  """``count`` summed over all processes."""
  if jax.process_count() == 1:
    return count
  counts = multihost_utils.process_allgather(np.asarray(count, np.int64))
  return int(np.sum(counts))


def hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Config flattened to ``a.b: value`` with TensorBoard-friendly values."""
  return {name: value if isinstance(value, (int, float, str, bool))
          else str(value)
          for name, value in run_identity.flatten(config).items()}
