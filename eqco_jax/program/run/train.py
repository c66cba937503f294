"""The pretraining loop: state, data, step, metrics, checkpoints, evaluation.

``train_and_evaluate(config, workdir)`` is what ``main`` calls. It is the
same for one CPU, a multi-GPU host and a TPU pod: every process runs it, the
mesh spans all devices, only data reading is split between processes, and
files are written by process 0 (checkpoints by all of them, through orbax).
What the loop keeps besides the state is ``bookkeeping``'s.
"""

from __future__ import annotations

import contextlib
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
from eqco_jax.core.errors import UserError
from eqco_jax.core.training import builders
from eqco_jax.core.types import Metrics
from eqco_jax.data import pipeline
from eqco_jax.data import sources
from eqco_jax.program.files import checkpointing
from eqco_jax.program.files import events
from eqco_jax.program.files import run_files
from eqco_jax.program.files.run_files import Progress
from eqco_jax.program.files.workdir import CONFIG, SUMMARY, Workdir, prepare
from eqco_jax.program.run import backbone_eval
from eqco_jax.program.run import bookkeeping
from eqco_jax.program.run import compilation
from eqco_jax.program.run import fit
from eqco_jax.program.run import pacing
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
  if config.final_eval or config.eval_every_steps > 0 or (
      config.eval_every_epochs > 0):
    fit.check_evaluation(config.eval_batch_size, config.image_size,
                         mesh.devices.size, jax.local_devices()[0])
  # A stranger's checkpoint is refused before anything is built or written.
  newest = checkpointing.check_workdir(workdir, config)
  workdir = prepare(workdir)
  # An image folder's lists are kept once the run has trained (a start that
  # failed lists again, so that the fix it asked for is seen).
  source = sources.get_source(config, keep_list=functools.partial(
      workdir.keep_file_list, process_index=jax.process_index(),
      agree=sharding.broadcast_text, trust_kept=newest is not None))
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
      if jax.process_index() == 0:  # mended, if lost or changed
        workdir.mend_run_config(config)
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
  # Its first event tells TensorBoard to drop what a killed run logged after
  # step first_step (this run logs it again).
  writer = events.create_writer(workdir, resumed_from=first_step,
                                just_logging=jax.process_index() > 0)
  if first_step == 0:
    writer.write_hparams(bookkeeping.hparams(config))
  evaluate_backbone = backbone_eval.make_backbone_evaluator(
      config, run.backbone, source, mesh)
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=total_steps, writer=writer)
  pacer = pacing.Pacer()
  batches, step_flops = pacer.fetching(pipeline.pretrain_batches(
      source, mesh, start_step=first_step, on_skipped=skipped.add)), 0.0
  step_fn = run.jit_train_step(mesh, run.preprocess(mean=source.info.mean,
                                                    std=source.info.std))
  if first_step < total_steps:  # (else only the summary is missing)
    first_batch = next(batches)
    step_fn, _, _ = compilation.compile_step(step_fn, state, first_batch)
    fit.check_step(step_fn, config, jax.local_devices()[0])
    step_flops = performance.flops_per_device(step_fn)
    batches = itertools.chain([first_batch], batches)
  throughput = performance.Throughput(
      batch_size=config.batch_size, num_devices=mesh.devices.size,
      step_flops=step_flops, peak=performance.peak_flops(jax.devices()[0]),
      pacer=pacer, steps=progress.timed_steps,
      seconds=progress.timed_seconds)
  profile = performance.StepProfile(workdir, first=first_step,
                                    num_steps=config.profile_steps)
  eval_every = run.derived.eval_every_steps
  # progress.json (process 0) and the skipped records, written off the loop.
  writes = run_files.BackgroundWrites(workdir.write_run_file)
  progress_writes = writes if jax.process_index() == 0 else None
  pending: list[Metrics] = []
  interval_began = first_step  # the step the current log interval began at
  with stopping.Stopping(manager, log_every_steps=config.log_every_steps,
                         state=state, resumed_from=first_step) as stop, \
       contextlib.closing(pacer):
    for step, batch in zip(range(first_step, total_steps), batches):
      profile.before_step(step)
      state, metrics = step_fn(state, batch)
      pending.append(metrics)
      done = step + 1
      pacer.dispatched(done, metrics)  # at most two steps ahead
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
            progress_writes, progress, done, metrics, began=interval_began,
            timed_steps=throughput.steps, timed_seconds=throughput.seconds)
        bookkeeping.log_skipped(skipped, began=interval_began, step=done)
        interval_began = done
      if eval_every > 0 and done % eval_every == 0:
        writer.write_scalars(done, evaluate_backbone(
            state.params, state.batch_stats, linear=False))
        throughput.pause(done)  # evaluation time is not training time
      if saving or stop_now:
        # Every point up to `done` on disk before a resume can start there.
        writer.flush()
        if jax.process_index() == 0:  # (the workdir may have been lost)
          writes.put(CONFIG, workdir.run_config_json(config))
        if skipped.by_step:
          writes.put(workdir.skipped_records_name(jax.process_index()),
                     skipped.to_json())
        checkpointing.save(manager, done, state, config)
      if stop_now:
        checkpointing.wait_until_saved(manager)
        writer.flush()
        _run_files_written(writes, workdir)
        logging.info("Stopped at step %d after %s; the checkpoint is "
                     "saved, run the same command to resume.", done,
                     stop.reason)
        stopping.park(batches)
        return {}
  checkpointing.wait_until_saved(manager)
  writer.flush()  # the whole training on disk before the final evaluation
  _run_files_written(writes, workdir)

  # ------------------------------------- the final evaluation, the summary.
  if config.final_eval:
    backbones = {"pretrained": (state.params, state.batch_stats)}
    if initial_backbone is not None:
      backbones["baseline"] = initial_backbone
    try:
      _final_evaluation(backbones, evaluate_backbone, workdir, progress)
    except stopping.Interrupted as signal_name:
      writer.flush()
      logging.info("Stopped in the final evaluation after %s; training "
                   "(step %d) and the evaluation's finished parts are saved, "
                   "run the same command to finish it.", signal_name,
                   total_steps)
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


# How long the end of training waits for its run files to be written.
WRITES_TIMEOUT_SECS = 30.0


def _run_files_written(writes: run_files.BackgroundWrites,
                       workdir: Workdir) -> None:
  """Waits for the run files handed to ``writes``.

  Raises:
    UserError: one still cannot be written after WRITES_TIMEOUT_SECS.
  """
  unwritten = writes.close(WRITES_TIMEOUT_SECS)
  if unwritten:
    name, why = next(iter(unwritten.items()))
    said = why.removeprefix("UserError: ")  # write_run_file's own sentence
    raise (UserError(said) if said != why else
           workdir.cannot_write(name, why))


def _final_evaluation(backbones: dict[str, tuple[Any, Any]],
                      evaluate_backbone: backbone_eval.BackboneEvaluator,
                      workdir: Workdir, progress: Progress) -> None:
  """Evaluates each of ``backbones`` (name: ``(params, batch_stats)``) that
  ``progress`` has no results for, keeping each result in the workdir as
  soon as it is known.

  Raises:
    stopping.Interrupted: a SIGTERM or SIGINT (single process); what
      finished is kept.
  """
  with stopping.Interrupts() as sigterm:
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
