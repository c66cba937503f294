"""The pretraining loop: state, data, step, metrics, checkpoints, evaluation.

``train_and_evaluate(config, workdir)`` is what ``main`` calls. It is the
same for one CPU, a multi-GPU host and a TPU pod: every process runs it, the
mesh spans all devices, only data reading is split between processes, and
files are written by process 0 (checkpoints by all of them, through orbax).
What the loop keeps besides the state is ``bookkeeping``'s.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from clu import periodic_actions

from eqco_jax.core import config as config_lib
from eqco_jax.core import sharding
from eqco_jax.core.training import builders
from eqco_jax.core.types import Metrics
from eqco_jax.data import pipeline
from eqco_jax.data import sources
from eqco_jax.program.files import checkpointing
from eqco_jax.program.files import events
from eqco_jax.program.files.run_files import Progress
from eqco_jax.program.files.workdir import SUMMARY, Workdir, prepare
from eqco_jax.program.run import backbone_eval
from eqco_jax.program.run import bookkeeping
from eqco_jax.program.run import compilation
from eqco_jax.program.run import performance
from eqco_jax.program.run import stopping
from eqco_jax.program.torchvision import reading


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: Workdir | str) -> dict[str, Any]:
  """Pretrains as ``config`` says, resuming from ``workdir`` when possible.

  Returns the summary also written to ``workdir/summary.json``; an empty dict
  when the run stopped early on SIGTERM (after saving a checkpoint).
  """
  # ------------------------------------------- set-up: the config, read once.
  workdir = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
  mesh = sharding.make_mesh()
  config_lib.validate(config, mesh.devices.size)
  advice = performance.per_device_batch_advice(config, mesh.devices.size)
  if advice:
    logging.warning("Note: %s", advice)
  # A stranger's checkpoint is refused before anything is built or written.
  newest = checkpointing.check_workdir(workdir, config)
  workdir = prepare(workdir)
  source = sources.get_source(config, keep_list=functools.partial(
      workdir.keep_file_list, write=jax.process_index() == 0))
  run = builders.build_pretraining(config, source.steps_per_epoch(
      source.split(sources.PRETRAIN), config.batch_size))
  if config.final_eval or run.derived.eval_every_steps > 0:
    # A source without labels says so before training.
    source.require(sources.EVAL_TRAIN, sources.EVAL_TEST)
  total_steps = run.total_steps
  # Its run files: a damaged one stops the run here, before anything is built.
  progress = workdir.read_progress()
  skipped = workdir.skipped_records(jax.process_index())
  if newest is not None and newest >= total_steps:
    finished = bookkeeping.finished_summary(
        config, workdir, progress, total_steps=total_steps,
        num_devices=mesh.devices.size, skipped=skipped)
    if finished is not None:
      logging.info("The run in %s is complete (step %d); nothing to do.",
                   workdir, newest)
      return finished

  # ------------------------------------------------- the state, or its resume.
  state = run.initial_state(mesh)
  # The random-init backbone of the final evaluation: a copy, as the step
  # donates the state.
  initial_backbone = None
  if "baseline" in bookkeeping.evaluated_backbones(config):
    initial_backbone = jax.tree.map(jnp.copy,
                                    (state.params, state.batch_stats))
  state = reading.initialise_backbone(state, config)  # config.init_from
  manager = checkpointing.create_manager(workdir, config)
  state = checkpointing.restore_latest(manager, state, config)
  # Written once the workdir's checkpoint (if any) has accepted the config.
  if jax.process_index() == 0:
    workdir.write_run_config(config)
  first_step = int(state.step)
  if first_step:
    logging.info("Resumed from the checkpoint of step %d.", first_step)

  # --------------------------------------------------------------- the loop.
  writer = events.create_writer(workdir,
                                just_logging=jax.process_index() > 0)
  if first_step == 0:
    writer.write_hparams(bookkeeping.hparams(config))
  evaluate_backbone = backbone_eval.make_backbone_evaluator(
      config, run.backbone, source, mesh)
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=total_steps, writer=writer)
  timed = performance.TimedBatches(pipeline.pretrain_batches(
      source, mesh, start_step=first_step, on_skipped=skipped.add))
  batches, step_flops = timed, 0.0
  step_fn = run.jit_train_step(mesh, run.preprocess(mean=source.info.mean,
                                                    std=source.info.std))
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
  eval_every = run.derived.eval_every_steps
  pending: list[Metrics] = []
  with stopping.Stopping(manager, log_every_steps=config.log_every_steps,
                         resumed_from=first_step) as stop:
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
        metrics = bookkeeping.mean_metrics(pending) | throughput.interval(done)
        pending = []
        writer.write_scalars(done, metrics)
        progress = bookkeeping.record_interval(
            workdir, progress, done, metrics, timed_steps=throughput.steps,
            timed_seconds=throughput.seconds)
      if eval_every > 0 and done % eval_every == 0:
        writer.write_scalars(done, evaluate_backbone(
            state.params, state.batch_stats, linear=False))
        throughput.pause(done)  # evaluation time is not training time
      if saving or stop_now:
        workdir.save_skipped_records(skipped, jax.process_index())
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
      _final_evaluation(backbones, evaluate_backbone, workdir, progress)
    except stopping.Interrupted:
      writer.flush()
      logging.info("Stopped in the final evaluation after SIGTERM; training "
                   "(step %d) and the evaluation's finished parts are saved, "
                   "run the same command to finish it.", total_steps)
      return {}
  summary = bookkeeping.summary(config, progress, total_steps=total_steps,
                                num_devices=mesh.devices.size,
                                skipped=skipped)
  if config.final_eval:
    writer.write_scalars(total_steps, {k: v for k, v in summary.items()
                                       if k.endswith(("top1", "top5"))})
  writer.flush()
  if jax.process_index() == 0:
    workdir.write_run_file(SUMMARY, summary)
  return summary


def _final_evaluation(backbones: dict[str, tuple[Any, Any]],
                      evaluate_backbone: backbone_eval.BackboneEvaluator,
                      workdir: Workdir, progress: Progress) -> None:
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
        workdir.write_progress(progress)
