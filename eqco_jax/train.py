"""The pretraining loop: state, data, step, metrics, checkpoints, evaluation.

``train_and_evaluate(config, workdir)`` is what ``main.py`` calls. It is the
same for one CPU, a multi-GPU host and a TPU pod: every process runs it, the
mesh spans all devices, only data reading is split between processes, and
files are written by process 0 (checkpoints by all of them, through orbax).
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import periodic_actions

from eqco_jax import builders
from eqco_jax import checkpointing
from eqco_jax import config as config_lib
from eqco_jax import device_augment
from eqco_jax import divergence
from eqco_jax import event_files
from eqco_jax import files
from eqco_jax import pretrained
from eqco_jax import sharding
from eqco_jax import skipped_records
from eqco_jax.data import pipeline
from eqco_jax.data import sources
from eqco_jax.evaluate import features as features_lib
from eqco_jax.evaluate import knn
from eqco_jax.evaluate import linear_probe


def total_train_steps(config: ml_collections.ConfigDict,
                      info: sources.DatasetInfo) -> int:
  """``num_train_steps`` if > 0, else epochs x steps per epoch."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  steps_per_epoch = max(info.num_train_examples // config.batch_size, 1)
  return int(config.num_epochs * steps_per_epoch)


def make_backbone_evaluator(config, mesh, info):
  """Returns ``evaluate(params, batch_stats, *, linear) -> dict`` for a run.

  The backbone runs with BN in inference mode on the un-augmented evaluation
  train and test splits. kNN top-1 always, against a memory bank that stays
  sharded over the devices (ImageNet's is 10 GB); with ``linear``, also the
  linear probe on the same features, brought to the host (small datasets).
  Built once so its jitted forward is reused.
  """
  apply_backbone = features_lib.backbone_apply_fn(
      builders.create_backbone(config))
  normalize = functools.partial(device_augment.normalize, mean=info.mean,
                                std=info.std)

  def features(variables, split):
    batches = pipeline.eval_batches(config, mesh, split=split, augment=False)
    return features_lib.extract_sharded_features(apply_backbone, variables,
                                                 batches, normalize)

  def on_host(x, y):
    """The real rows (label >= 0) of sharded ``[n, B, C]`` features."""
    x, y = features_lib.gather_to_host(x), features_lib.gather_to_host(y)
    real = y.reshape(-1) >= 0
    return x.reshape(-1, x.shape[-1])[real], y.reshape(-1)[real]

  def evaluate_backbone(params, batch_stats, *, linear: bool
                        ) -> dict[str, float]:
    variables = features_lib.backbone_variables(params, batch_stats)
    bank = features(variables, "train")
    test = features(variables, "test")
    results = {"knn_top1": knn.knn_accuracy_sharded(
        *bank, *test, mesh=mesh, num_classes=info.num_classes,
        k=config.knn_k, temperature=config.knn_temperature)}
    if linear:
      probe = linear_probe.linear_eval_on_features(
          *on_host(*bank), *on_host(*test), num_classes=info.num_classes,
          rng=jax.random.key(config.seed), **config.linear_probe.to_dict())
      results.update(linear_top1=probe["top1"], linear_top5=probe["top5"])
    return results

  return evaluate_backbone


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Pretrains as ``config`` says, resuming from ``workdir`` when possible.

  Returns the summary also written to ``workdir/summary.json``; an empty dict
  when the run stopped early on SIGTERM (after saving a checkpoint).
  """
  mesh = sharding.make_mesh()
  config_lib.validate(config, mesh.devices.size)
  # A stranger's checkpoint is refused before anything is built or written.
  checkpointing.check_workdir(workdir, config)
  info = sources.get_source(config).info
  total_steps = total_train_steps(config, info)
  directory = files.prepare_workdir(workdir)

  encoder = builders.create_encoder(config)
  tx, schedule = builders.create_optimizer(config, total_steps)
  state = builders.initial_state(config, encoder, tx, mesh)
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
    files.write_json_atomic(directory / "config.json",
                            json.loads(config.to_json_best_effort()))
  first_step = int(state.step)
  summary_path = directory / "summary.json"
  if first_step >= total_steps and summary_path.exists():
    logging.info("The run in %s is complete (step %d); nothing to do.",
                 workdir, first_step)
    return files.read_json(summary_path)
  if first_step:
    logging.info("Resumed from the checkpoint of step %d.", first_step)

  step_fn = builders.create_train_step(config, encoder, tx, schedule, mesh,
                                       mean=info.mean, std=info.std)

  writer = event_files.create_writer(
      workdir, just_logging=jax.process_index() > 0)
  if first_step == 0:
    writer.write_hparams(_flat_hparams(config))
  evaluate_backbone = make_backbone_evaluator(config, mesh, info)
  hooks = [periodic_actions.ReportProgress(num_train_steps=total_steps,
                                           writer=writer)]
  skipped = skipped_records.load(workdir)
  batches = pipeline.pretrain_batches(config, mesh, start_step=first_step,
                                      skipped=skipped)

  pending, last_metrics, first_metrics = [], {}, None
  timed_steps, timed_seconds, timer = 0, 0.0, None
  with checkpointing.Preemption() as preemption:
    for step in range(first_step, total_steps):
      batch = next(batches)
      state, metrics = step_fn(state, batch)
      pending.append(metrics)
      done = step + 1
      for hook in hooks:
        hook(done)
      if done % config.log_every_steps == 0 or done == total_steps:
        _stop_if_diverged(pending, done, manager)
        last_metrics = _mean_metrics(pending)
        pending = []
        # Throughput over whole log intervals after the first (compilation).
        now = time.perf_counter()
        if timer is not None:
          timed_seconds += now - timer[1]
          timed_steps += done - timer[0]
          last_metrics["images_per_sec"] = (
              (done - timer[0]) * config.batch_size / (now - timer[1]))
        timer = (done, now)
        writer.write_scalars(done, last_metrics)
        if first_metrics is None:
          first_metrics = _first_interval_metrics(directory, last_metrics)
      if config.eval_every_steps > 0 and done % config.eval_every_steps == 0:
        monitor = evaluate_backbone(state.params, state.batch_stats,
                                    linear=False)
        writer.write_scalars(done, monitor)
        if timer is not None:  # evaluation time is not training time
          timer = (done, time.perf_counter()) if timer[0] == done else None
      if done % config.checkpoint_every_steps == 0 or done == total_steps:
        _stop_if_diverged(pending, done, manager, state)
        skipped_records.save(workdir, skipped)
      saved = checkpointing.save(manager, done, state, config,
                                 force=done == total_steps)
      if done < total_steps and preemption.any_process(
          done, manager, sync_every=config.log_every_steps):
        if not saved:
          _stop_if_diverged(pending, done, manager, state)
          skipped_records.save(workdir, skipped)
          checkpointing.save(manager, done, state, config, force=True)
        manager.wait_until_finished()
        writer.flush()
        logging.info("Stopped at step %d after SIGTERM; the checkpoint is "
                     "saved, run the same command to resume.", done)
        return {}
  manager.wait_until_finished()

  summary = {
      "method": config.method, "dataset": config.dataset,
      "model": config.model, "eqco": config_lib.loss_alpha(config) is not None,
      "alpha": config_lib.loss_alpha(config),
      "num_negatives": config_lib.negatives_per_query(config),
      "steps": total_steps, "batch_size": config.batch_size,
      "num_devices": int(mesh.devices.size),
      "final_loss": float(last_metrics.get("loss", float("nan"))),
      # Mean gradient norm of the first log interval (EqCo keeps it about
      # the same whatever K; plain InfoNCE's shrinks at small K).
      "initial_grad_norm": (first_metrics or {}).get("grad_norm"),
      "images_per_sec": (timed_steps * config.batch_size / timed_seconds
                         if timed_seconds else None),
      # Unreadable images left out of their batches (see data.unreadable).
      "skipped_records": skipped_records.total(skipped, total_steps),
  }
  if config.get("final_eval", False):
    summary.update(evaluate_backbone(state.params, state.batch_stats,
                                     linear=True))
    if initial_backbone is not None:
      base = evaluate_backbone(*initial_backbone, linear=True)
      summary.update({f"baseline_{k}": v for k, v in base.items()})
    writer.write_scalars(total_steps, {k: v for k, v in summary.items()
                                       if k.endswith(("top1", "top5"))})
  writer.flush()
  if jax.process_index() == 0:
    files.write_json_atomic(summary_path, summary)
  return summary


def print_summary(summary: dict[str, Any]) -> None:
  """Prints the learned-vs-random-init table of a finished run."""
  print(f"\n{summary['method']} on {summary['dataset']}: {summary['steps']} "
        f"steps, final loss {summary['final_loss']:.4f}, "
        f"{summary['images_per_sec'] or 0:.0f} images/s")
  if "baseline_linear_top1" not in summary:
    return
  print(f"{'encoder':<22}{'kNN top-1':>12}{'linear top-1':>14}")
  for name, prefix in (("pretrained", ""), ("random init", "baseline_")):
    print(f"{name:<22}{summary[prefix + 'knn_top1']:>12.4f}"
          f"{summary[prefix + 'linear_top1']:>14.4f}")


def _first_interval_metrics(directory, metrics: dict[str, float]
                            ) -> dict[str, float]:
  """The first log interval's metrics, kept in the workdir across restarts."""
  path = directory / "first_interval_metrics.json"
  recorded = files.read_json(path)
  if recorded is not None:
    return recorded
  if jax.process_index() == 0:
    files.write_json_atomic(path, metrics)
  return metrics


def _stop_if_diverged(pending: list[dict[str, jax.Array]], done: int,
                      manager: Any, state: Any = None) -> None:
  """Raises divergence.Diverged, once in-flight saves are done, if a metric
  of the steps in ``pending`` (the last ends at ``done``) or ``state`` is
  not finite."""
  found = divergence.first_non_finite(pending, done - len(pending) + 1)
  if found is not None:
    step, name, value = found
    what = f"{name} was {value}"
  elif state is not None and not divergence.state_is_finite(state):
    step, what = done, "the train state holds non-finite values"
  else:
    return
  manager.wait_until_finished()
  raise divergence.Diverged(divergence.message(
      step, what, manager.latest_step(), str(manager.directory)))


def _mean_metrics(metrics: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Host-side mean of per-step metric dicts (one device-to-host copy)."""
  stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *metrics))
  return {name: float(np.mean(values)) for name, values in stacked.items()}


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Config flattened to ``a.b: value`` with TensorBoard-friendly values."""
  flat = {}

  def visit(prefix, node):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if isinstance(value, ml_collections.ConfigDict):
        visit(name + ".", value)
      elif isinstance(value, (int, float, str, bool)):
        flat[name] = value
      else:
        flat[name] = str(value)

  visit("", config)
  return flat
