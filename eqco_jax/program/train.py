"""The pretraining loop: state, data, step, metrics, checkpoints, evaluation.

``train_and_evaluate(config, workdir)`` is what ``main`` calls. It is the
same for one CPU, a multi-GPU host and a TPU pod: every process runs it, the
mesh spans all devices, only data reading is split between processes, and
files are written by process 0 (checkpoints by all of them, through orbax).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import periodic_actions
from jax.experimental import multihost_utils

from eqco_jax.core import builders
from eqco_jax.core import config as config_lib
from eqco_jax.core import run_identity
from eqco_jax.core import sharding
from eqco_jax.data import pipeline
from eqco_jax.data import sources
from eqco_jax.program import backbone_eval
from eqco_jax.program import checkpointing
from eqco_jax.program import compilation
from eqco_jax.program import performance
from eqco_jax.program import pretrained
from eqco_jax.program import stopping
from eqco_jax.program import tensorboard_writer
from eqco_jax.program import workdir as workdir_lib

Metrics = dict[str, jax.Array]


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Pretrains as ``config`` says, resuming from ``workdir`` when possible.

  Returns the summary also written to ``workdir/summary.json``; an empty dict
  when the run stopped early on SIGTERM (after saving a checkpoint).
  """
  # ------------------------------------------- set-up: the config, read once.
  mesh = sharding.make_mesh()
  config_lib.validate(config, mesh.devices.size)
  advice = config_lib.per_device_batch_advice(config, mesh.devices.size)
  if advice:
    logging.warning("Note: %s", advice)
  # A stranger's checkpoint is refused before anything is built or written.
  newest = checkpointing.check_workdir(workdir, config)
  directory = workdir_lib.prepare(workdir)
  source = sources.get_source(config, keep_list=functools.partial(
      directory.keep_file_list, write=jax.process_index() == 0))
  steps_per_epoch = source.steps_per_epoch(source.split(sources.PRETRAIN),
                                           config.batch_size)
  if _evaluates(config):  # a source without labels says so before training
    for split in ("train", "test"):
      pipeline.num_eval_examples(source, split)
  run = builders.build_pretraining(
      config, builders.total_train_steps(config, steps_per_epoch))
  total_steps = run.total_steps
  # Its records: a damaged one stops the run here, before anything is built.
  progress = directory.read_progress()
  summary = directory.read_json(workdir_lib.SUMMARY)
  skipped = directory.skipped_records(jax.process_index())
  if newest is not None and newest >= total_steps:
    finished = _finished_summary(config, directory, summary, progress,
                                 total_steps=total_steps, mesh=mesh,
                                 skipped=skipped)
    if finished is not None:
      logging.info("The run in %s is complete (step %d); nothing to do.",
                   workdir, newest)
      return finished

  # ------------------------------------------------- the state, or its resume.
  state = run.initial_state(mesh)
  # The random-init backbone of the final evaluation: a copy, as the step
  # donates the state.
  initial_backbone = None
  if "baseline" in _evaluated_backbones(config):
    initial_backbone = jax.tree.map(jnp.copy,
                                    (state.params, state.batch_stats))
  state = pretrained.initialise_backbone(state, config)  # config.init_from
  manager = checkpointing.create_manager(workdir, config)
  state = checkpointing.restore_latest(manager, state, config)
  # Written once the workdir's checkpoint (if any) has accepted the config.
  if jax.process_index() == 0:
    directory.write_run_config(config)
  first_step = int(state.step)
  if first_step:
    logging.info("Resumed from the checkpoint of step %d.", first_step)

  # --------------------------------------------------------------- the loop.
  info = source.info
  writer = tensorboard_writer.create_writer(
      workdir, just_logging=jax.process_index() > 0)
  if first_step == 0:
    writer.write_hparams(_hparams(config))
  evaluate_backbone = backbone_eval.make_backbone_evaluator(config, source,
                                                            mesh)
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=total_steps, writer=writer)
  timed = performance.TimedBatches(pipeline.pretrain_batches(
      source, mesh, start_step=first_step, on_skipped=skipped.add))
  batches, step_flops = timed, 0.0
  step_fn = run.jit_train_step(mesh, run.preprocess(mean=info.mean,
                                                    std=info.std))
  if first_step < total_steps:  # (else only the summary is missing)
    first_batch = next(timed)
    step_fn, _, _ = compilation.compile_step(step_fn, state, first_batch)
    step_flops = performance.flops_per_device(step_fn)
    batches = itertools.chain([first_batch], timed)
  throughput = performance.Throughput(
      batch_size=config.batch_size, num_devices=mesh.devices.size,
      step_flops=step_flops, peak=performance.peak_flops(jax.devices()[0]),
      batches=timed, steps=progress.timed_steps,
      seconds=progress.timed_seconds)
  profile = performance.StepProfile(workdir, first=first_step,
                                    num_steps=config.profile_steps)
  pending: list[Metrics] = []
  with stopping.Stopping(manager,
                         log_every_steps=config.log_every_steps) as stop:
    for step, batch in zip(range(first_step, total_steps), batches):
      profile.before_step(step)
      state, metrics = step_fn(state, batch)
      pending.append(metrics)
      done = step + 1
      profile.after_step(done, state)
      report_progress(done)
      last = done == total_steps
      saving = done % config.checkpoint_every_steps == 0 or last
      stop_now = stop.after_step(done, pending, state, saving=saving,
                                 last=last)
      if done % config.log_every_steps == 0 or last:
        metrics = _mean_metrics(pending) | throughput.interval(done)
        pending = []
        writer.write_scalars(done, metrics)
        progress = _record_interval(directory, progress, done, metrics,
                                    throughput)
      if config.eval_every_steps > 0 and done % config.eval_every_steps == 0:
        writer.write_scalars(done, evaluate_backbone(
            state.params, state.batch_stats, linear=False))
        throughput.pause(done)  # evaluation time is not training time
      if saving or stop_now:
        directory.save_skipped_records(skipped, jax.process_index())
        checkpointing.save(manager, done, state, config)
      if stop_now:
        checkpointing.wait_until_saved(manager)
        writer.flush()
        logging.info("Stopped at step %d after SIGTERM; the checkpoint is "
                     "saved, run the same command to resume.", done)
        return {}
  checkpointing.wait_until_saved(manager)
  writer.flush()  # the whole training on disk before the final evaluation

  # ------------------------------------- the final evaluation, the summary.
  if config.final_eval:
    backbones = {"pretrained": (state.params, state.batch_stats)}
    if initial_backbone is not None:
      backbones["baseline"] = initial_backbone
    try:
      _final_evaluation(backbones, evaluate_backbone, directory, progress)
    except stopping.Interrupted:
      writer.flush()
      logging.info("Stopped in the final evaluation after SIGTERM; training "
                   "(step %d) and the evaluation's finished parts are saved, "
                   "run the same command to finish it.", total_steps)
      return {}
  summary = _summary(config, progress, total_steps=total_steps, mesh=mesh,
                     skipped=skipped, images_per_sec=throughput.mean())
  if config.final_eval:
    writer.write_scalars(total_steps, {k: v for k, v in summary.items()
                                       if k.endswith(("top1", "top5"))})
  writer.flush()
  if jax.process_index() == 0:
    directory.write_json(workdir_lib.SUMMARY, summary)
  return summary


def _evaluates(config: ml_collections.ConfigDict) -> bool:
  """Whether the run evaluates its backbone (kNN monitor or final)."""
  return bool(config.final_eval) or config.eval_every_steps > 0


def _evaluated_backbones(config: ml_collections.ConfigDict) -> set[str]:
  """The backbones the final evaluation of ``config`` evaluates."""
  if not config.final_eval:
    return set()
  return {"pretrained", "baseline"} if config.final_eval_baseline else {
      "pretrained"}


def _summary(config: ml_collections.ConfigDict,
             progress: workdir_lib.Progress, *, total_steps: int,
             mesh: jax.sharding.Mesh, skipped: workdir_lib.SkippedRecords,
             images_per_sec: float | None) -> dict[str, Any]:
  """The run's summary, from ``progress`` (with the final evaluation's
  finished parts) and the rest of what the run knows."""
  trained = ((progress.last_interval or {}) if progress.step == total_steps
             else {})
  alpha = config_lib.loss_alpha(config)
  summary = {
      "method": config.method, "dataset": config.dataset,
      "model": config.model, "eqco": alpha is not None, "alpha": alpha,
      "num_negatives": config_lib.negatives_per_query(config),
      "steps": total_steps, "batch_size": config.batch_size,
      "num_devices": int(mesh.devices.size),
      # None only where progress.json was lost (see workdir.read_json).
      "final_loss": trained.get("loss"),
      # Mean gradient norm of the first log interval (EqCo keeps it about
      # the same whatever K; plain InfoNCE's shrinks at small K).
      "initial_grad_norm": (progress.first_interval or {}).get("grad_norm"),
      "images_per_sec": images_per_sec,
      # Unreadable images left out of their batches (see data.unreadable).
      "skipped_records": _all_processes_total(skipped.count(total_steps)),
  }
  for name, results in progress.final_evaluation.items():
    prefix = "" if name == "pretrained" else f"{name}_"
    summary.update({prefix + k: v for k, v in results.items()})
  return summary


def _finished_summary(config: ml_collections.ConfigDict,
                      directory: workdir_lib.Workdir,
                      summary: Any, progress: workdir_lib.Progress, *,
                      total_steps: int, mesh: jax.sharding.Mesh,
                      skipped: workdir_lib.SkippedRecords
                      ) -> dict[str, Any] | None:
  """The summary of a run whose training is checkpointed to its end: the
  one in the workdir, or one made from ``progress`` (and written) when its
  final evaluation is done too; None when something is left to do."""
  if isinstance(summary, dict):
    return summary
  if progress.step != total_steps or not _evaluated_backbones(config) <= set(
      progress.final_evaluation):
    return None
  summary = _summary(config, progress, total_steps=total_steps, mesh=mesh,
                     skipped=skipped,
                     images_per_sec=performance.images_per_sec(
                         config.batch_size, progress.timed_steps,
                         progress.timed_seconds))
  if jax.process_index() == 0:
    directory.write_run_config(config)
    directory.write_json(workdir_lib.SUMMARY, summary)
  return summary


def summary_table(summary: dict[str, Any]) -> str:
  """A finished run's result: its loss and throughput, and the learned vs
  random-init backbone's kNN and linear top-1 when it has them."""
  loss, rate = summary["final_loss"], summary["images_per_sec"]
  lines = [f"{summary['method']} on {summary['dataset']}: {summary['steps']} "
           f"steps, final loss {'unknown' if loss is None else f'{loss:.4f}'}"
           f", {rate or 0:.0f} images/s"]
  if "baseline_linear_top1" in summary:
    lines.append(f"{'encoder':<22}{'kNN top-1':>12}{'linear top-1':>14}")
    for name, prefix in (("pretrained", ""), ("random init", "baseline_")):
      lines.append(f"{name:<22}{summary[prefix + 'knn_top1']:>12.4f}"
                   f"{summary[prefix + 'linear_top1']:>14.4f}")
  return "\n".join(lines)


def _record_interval(directory: workdir_lib.Workdir,
                     progress: workdir_lib.Progress, step: int,
                     metrics: dict[str, float],
                     throughput: performance.Throughput
                     ) -> workdir_lib.Progress:
  """``progress`` after the log interval that ends at ``step``, kept in the
  workdir (process 0)."""
  progress = dataclasses.replace(
      progress, step=step, last_interval=metrics,
      first_interval=progress.first_interval or metrics,
      timed_steps=throughput.steps, timed_seconds=throughput.seconds,
      final_evaluation={})
  if jax.process_index() == 0:
    directory.write_progress(progress)
  return progress


def _final_evaluation(backbones: dict[str, tuple[Any, Any]],
                      evaluate_backbone: backbone_eval.BackboneEvaluator,
                      directory: workdir_lib.Workdir,
                      progress: workdir_lib.Progress) -> None:
  """Evaluates each of ``backbones`` (name: ``(params, batch_stats)``) that
  ``progress`` has no results for, keeping each result in the workdir as
  soon as it is known.

  Raises:
    stopping.Interrupted: a SIGTERM (single process); what finished is kept.
  """
  with stopping.SigtermInterrupts() as sigterm:
    for name, (params, batch_stats) in backbones.items():
      if name in progress.final_evaluation:
        logging.info("Final evaluation, %s backbone: done before.", name)
        continue
      logging.info("Final evaluation, %s backbone.", name)
      progress.final_evaluation[name] = evaluate_backbone(
          params, batch_stats, linear=True, check=sigterm.check)
      sigterm.check()
      if jax.process_index() == 0:
        directory.write_progress(progress)


def _mean_metrics(metrics: list[Metrics]) -> dict[str, float]:
  """Host-side mean of per-step metric dicts (one device-to-host copy)."""
  stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *metrics))
  return {name: float(np.mean(values)) for name, values in stacked.items()}


def _all_processes_total(count: int) -> int:
  """``count`` summed over all processes."""
  if jax.process_count() == 1:
    return count
  counts = multihost_utils.process_allgather(np.asarray(count, np.int64))
  return int(np.sum(counts))


def _hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Config flattened to ``a.b: value`` with TensorBoard-friendly values."""
  return {name: value if isinstance(value, (int, float, str, bool))
          else str(value)
          for name, value in run_identity.flatten(config).items()}
