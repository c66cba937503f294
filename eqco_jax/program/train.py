"""The pretraining loop: state, data, step, metrics, checkpoints, evaluation.

``train_and_evaluate(config, workdir)`` is what ``main`` calls. It is the
same for one CPU, a multi-GPU host and a TPU pod: every process runs it, the
mesh spans all devices, only data reading is split between processes, and
files are written by process 0 (checkpoints by all of them, through orbax).
"""

from __future__ import annotations

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
  checkpointing.check_workdir(workdir, config)
  source = sources.get_source(config)
  steps_per_epoch = source.steps_per_epoch(source.split(sources.PRETRAIN),
                                           config.batch_size)
  run = builders.build_pretraining(
      config, builders.total_train_steps(config, steps_per_epoch))
  total_steps = run.total_steps
  directory = workdir_lib.prepare(workdir)

  # ------------------------------------------------- the state, or its resume.
  state = run.initial_state(mesh)
  # The random-init backbone of the final evaluation: a copy, as the step
  # donates the state.
  initial_backbone = None
  if config.final_eval and config.final_eval_baseline:
    initial_backbone = jax.tree.map(jnp.copy,
                                    (state.params, state.batch_stats))
  state = pretrained.initialise_backbone(state, config)  # config.init_from
  manager = checkpointing.create_manager(workdir, config)
  state = checkpointing.restore_latest(manager, state, config)
  # Written once the workdir's checkpoint (if any) has accepted the config.
  if jax.process_index() == 0:
    directory.write_run_config(config)
  first_step = int(state.step)
  summary = directory.read_json(workdir_lib.SUMMARY)
  if first_step >= total_steps and summary is not None:
    logging.info("The run in %s is complete (step %d); nothing to do.",
                 workdir, first_step)
    return summary
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
  progress = periodic_actions.ReportProgress(num_train_steps=total_steps,
                                             writer=writer)
  skipped = directory.skipped_records(jax.process_index())
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
      batches=timed)
  profile = performance.StepProfile(workdir, first=first_step,
                                    num_steps=config.profile_steps)
  pending: list[Metrics] = []
  last_metrics, first_metrics = {}, None
  with stopping.Stopping(manager,
                         log_every_steps=config.log_every_steps) as stop:
    for step, batch in zip(range(first_step, total_steps), batches):
      profile.before_step(step)
      state, metrics = step_fn(state, batch)
      pending.append(metrics)
      done = step + 1
      profile.after_step(done, state)
      progress(done)
      last = done == total_steps
      saving = done % config.checkpoint_every_steps == 0 or last
      stop_now = stop.after_step(done, pending, state, saving=saving,
                                 last=last)
      if done % config.log_every_steps == 0 or last:
        last_metrics = _mean_metrics(pending) | throughput.interval(done)
        pending = []
        writer.write_scalars(done, last_metrics)
        if first_metrics is None:
          first_metrics = _first_interval_metrics(directory, last_metrics)
      if config.eval_every_steps > 0 and done % config.eval_every_steps == 0:
        writer.write_scalars(done, evaluate_backbone(
            state.params, state.batch_stats, linear=False))
        throughput.pause(done)  # evaluation time is not training time
      if saving or stop_now:
        directory.save_skipped_records(skipped, jax.process_index())
        checkpointing.save(manager, done, state, config)
      if stop_now:
        manager.wait_until_finished()
        writer.flush()
        logging.info("Stopped at step %d after SIGTERM; the checkpoint is "
                     "saved, run the same command to resume.", done)
        return {}
  manager.wait_until_finished()

  # ------------------------------------------------------------ the summary.
  alpha = config_lib.loss_alpha(config)
  summary = {
      "method": config.method, "dataset": config.dataset,
      "model": config.model, "eqco": alpha is not None, "alpha": alpha,
      "num_negatives": config_lib.negatives_per_query(config),
      "steps": total_steps, "batch_size": config.batch_size,
      "num_devices": int(mesh.devices.size),
      "final_loss": float(last_metrics.get("loss", float("nan"))),
      # Mean gradient norm of the first log interval (EqCo keeps it about
      # the same whatever K; plain InfoNCE's shrinks at small K).
      "initial_grad_norm": (first_metrics or {}).get("grad_norm"),
      "images_per_sec": throughput.mean(),
      # Unreadable images left out of their batches (see data.unreadable).
      "skipped_records": _all_processes_total(skipped.count(total_steps)),
  }
  if config.final_eval:
    summary.update(evaluate_backbone(state.params, state.batch_stats,
                                     linear=True))
    if initial_backbone is not None:
      baseline = evaluate_backbone(*initial_backbone, linear=True)
      summary.update({f"baseline_{k}": v for k, v in baseline.items()})
    writer.write_scalars(total_steps, {k: v for k, v in summary.items()
                                       if k.endswith(("top1", "top5"))})
  writer.flush()
  if jax.process_index() == 0:
    directory.write_json(workdir_lib.SUMMARY, summary)
  return summary


def summary_table(summary: dict[str, Any]) -> str:
  """A finished run's result: its loss and throughput, and the learned vs
  random-init backbone's kNN and linear top-1 when it has them."""
  lines = [f"{summary['method']} on {summary['dataset']}: {summary['steps']} "
           f"steps, final loss {summary['final_loss']:.4f}, "
           f"{summary['images_per_sec'] or 0:.0f} images/s"]
  if "baseline_linear_top1" in summary:
    lines.append(f"{'encoder':<22}{'kNN top-1':>12}{'linear top-1':>14}")
    for name, prefix in (("pretrained", ""), ("random init", "baseline_")):
      lines.append(f"{name:<22}{summary[prefix + 'knn_top1']:>12.4f}"
                   f"{summary[prefix + 'linear_top1']:>14.4f}")
  return "\n".join(lines)


def _first_interval_metrics(directory: workdir_lib.Workdir,
                            metrics: dict[str, float]) -> dict[str, float]:
  """The first log interval's metrics, kept in the workdir across restarts."""
  recorded = directory.read_json(workdir_lib.FIRST_INTERVAL_METRICS)
  if recorded is not None:
    return recorded
  if jax.process_index() == 0:
    directory.write_json(workdir_lib.FIRST_INTERVAL_METRICS, metrics)
  return metrics


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
