"""The pretraining loop: state, data, step, metrics, checkpoints, evaluation.

``train_and_evaluate(config, workdir)`` is what ``main.py`` calls. It is the
same for one CPU, a multi-GPU host and a TPU pod: every process runs it, the
mesh spans all devices, only data reading is split between processes, and
files are written by process 0 (checkpoints by all of them, through orbax).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from clu import periodic_actions
from jax.experimental import multihost_utils

from eqco_jax import checkpointing
from eqco_jax import config as config_lib
from eqco_jax import datasets
from eqco_jax import device_augment
from eqco_jax import evaluate
from eqco_jax import input_pipeline
from eqco_jax import json_files
from eqco_jax import models
from eqco_jax import optim
from eqco_jax import sharding
from eqco_jax import train_step as train_step_lib
from eqco_jax.train_state import TrainState

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Preemption:
  """Remembers a SIGTERM so the loop can save a checkpoint and stop cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):
      del frame
      logging.warning("Received signal %d: saving a checkpoint, then exiting.",
                      signum)
      self.requested = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # Not the main thread: leave signals alone.
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def any_process(self, step: int, manager, sync_every: int) -> bool:
    """True on every process when any process was asked to stop.

    JAX's preemption notice (TPU maintenance events) is checked every step;
    a SIGTERM of one process reaches the others every ``sync_every`` steps,
    so that the loop does not pay a cross-host sync each step.
    """
    if manager.reached_preemption(step):
      return True
    if jax.process_count() == 1:
      return self.requested
    if step % sync_every:
      return False
    flags = multihost_utils.process_allgather(np.array(self.requested))
    return bool(np.any(flags))


def create_encoder(config: ml_collections.ConfigDict) -> models.Encoder:
  """The encoder (backbone + head) the config describes."""
  return models.create_encoder(
      config.model, config.head, width=config.width,
      small_image=config.small_image_stem,
      head_hidden_dim=config.head_hidden_dim,
      head_out_dim=config.head_out_dim, bn_group_size=config.bn_group_size,
      zero_init_residual=config.zero_init_residual,
      dtype=DTYPES[config.dtype], remat=config.remat)


def create_backbone(config: ml_collections.ConfigDict) -> models.ResNet:
  """The encoder's backbone alone, for feature extraction (BN in eval mode)."""
  return models.create_backbone(
      config.model, width=config.width, small_image=config.small_image_stem,
      zero_init_residual=config.zero_init_residual,
      dtype=DTYPES[config.dtype])


def total_train_steps(config: ml_collections.ConfigDict,
                      info: datasets.DatasetInfo) -> int:
  """``num_train_steps`` if > 0, else epochs x steps per epoch."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  steps_per_epoch = max(info.num_train_examples // config.batch_size, 1)
  return int(config.num_epochs * steps_per_epoch)


def initial_state(config, encoder, tx, mesh) -> TrainState:
  """A fresh, replicated TrainState for ``config.seed``."""
  create = functools.partial(
      train_step_lib.create_train_state, encoder=encoder, tx=tx,
      image_shape=(config.image_size, config.image_size, 3),
      embed_dim=config.head_out_dim,
      queue_size=config.queue_size if config.method == "mocov2" else None)
  return train_step_lib.jit_create_train_state(create, mesh)(
      jax.random.key(config.seed))


def make_backbone_evaluator(config, mesh, info):
  """Returns ``evaluate(params, batch_stats, *, linear) -> dict`` for a run.

  The backbone runs with BN in inference mode on the un-augmented evaluation
  train and test splits; kNN top-1 always, the linear probe (features
  extracted once) with ``linear``. Built once so its jitted forward is reused.
  """
  apply_backbone = evaluate.backbone_apply_fn(create_backbone(config))
  normalize = functools.partial(device_augment.normalize, mean=info.mean,
                                std=info.std)

  def features(variables, split):
    batches = input_pipeline.eval_batches(config, mesh, split=split,
                                          augment=False)
    return evaluate.extract_features(apply_backbone, variables, batches,
                                     normalize)

  def evaluate_backbone(params, batch_stats, *, linear: bool
                        ) -> dict[str, float]:
    variables = evaluate.backbone_variables(params, batch_stats)
    train_x, train_y = features(variables, "train")
    test_x, test_y = features(variables, "test")
    results = {"knn_top1": evaluate.knn_accuracy(
        train_x, train_y, test_x, test_y, num_classes=info.num_classes,
        k=config.knn_k, temperature=config.knn_temperature)}
    if linear:
      probe = evaluate.linear_eval_on_features(
          train_x, train_y, test_x, test_y, num_classes=info.num_classes,
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
  info = datasets.get_info(config)
  total_steps = total_train_steps(config, info)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  encoder = create_encoder(config)
  schedule = optim.learning_rate_schedule(
      config.base_learning_rate, config.batch_size, config.warmup_steps,
      total_steps)
  tx = optim.create_optimizer(config, schedule)
  state = initial_state(config, encoder, tx, mesh)
  manager = checkpointing.create_manager(workdir, config)
  state = checkpointing.restore_latest(manager, state, config)
  first_step = int(state.step)
  summary_path = os.path.join(workdir, "summary.json")
  if first_step >= total_steps and os.path.exists(summary_path):
    logging.info("The run in %s is complete (step %d); nothing to do.",
                 workdir, first_step)
    with open(summary_path) as f:
      return json.load(f)
  if first_step:
    logging.info("Resumed from the checkpoint of step %d.", first_step)

  preprocess = functools.partial(
      device_augment.prepare_views, augment_config=config.augment,
      mean=info.mean, std=info.std)
  step_fn = train_step_lib.jit_train_step(
      train_step_lib.make_train_step(config, encoder, tx, schedule, preprocess),
      mesh)

  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  if first_step == 0:
    writer.write_hparams(_flat_hparams(config))
  evaluate_backbone = make_backbone_evaluator(config, mesh, info)
  hooks = [periodic_actions.ReportProgress(num_train_steps=total_steps,
                                           writer=writer)]
  batches = input_pipeline.pretrain_batches(config, mesh, start_step=first_step)

  pending, last_metrics, first_metrics = [], {}, None
  timed_steps, timed_seconds, timer = 0, 0.0, None
  with Preemption() as preemption:
    for step in range(first_step, total_steps):
      batch = next(batches)
      state, metrics = step_fn(state, batch)
      pending.append(metrics)
      done = step + 1
      for hook in hooks:
        hook(done)
      if done % config.log_every_steps == 0 or done == total_steps:
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
          first_metrics = _first_interval_metrics(workdir, last_metrics)
      if config.eval_every_steps > 0 and done % config.eval_every_steps == 0:
        knn = evaluate_backbone(state.params, state.batch_stats,
                                linear=False)
        writer.write_scalars(done, knn)
        if timer is not None:  # evaluation time is not training time
          timer = (done, time.perf_counter()) if timer[0] == done else None
      saved = checkpointing.save(manager, done, state, config,
                                 force=done == total_steps)
      if done < total_steps and preemption.any_process(
          done, manager, sync_every=config.log_every_steps):
        if not saved:
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
      "num_negatives": config.num_negatives or (
          config.queue_size if config.method == "mocov2"
          else config.batch_size - 1),
      "steps": total_steps, "batch_size": config.batch_size,
      "num_devices": int(mesh.devices.size),
      "final_loss": float(last_metrics.get("loss", float("nan"))),
      # Mean gradient norm of the first log interval (EqCo keeps it about
      # the same whatever K; plain InfoNCE's shrinks at small K).
      "initial_grad_norm": (first_metrics or {}).get("grad_norm"),
      "images_per_sec": (timed_steps * config.batch_size / timed_seconds
                         if timed_seconds else None),
  }
  if config.get("final_eval", False):
    summary.update(evaluate_backbone(state.params, state.batch_stats,
                                     linear=True))
    if config.final_eval_baseline:
      baseline = initial_state(config, encoder, tx, mesh)
      base = evaluate_backbone(baseline.params, baseline.batch_stats,
                               linear=True)
      summary.update({f"baseline_{k}": v for k, v in base.items()})
    writer.write_scalars(total_steps, {k: v for k, v in summary.items()
                                       if k.endswith(("top1", "top5"))})
  writer.flush()
  if jax.process_index() == 0:
    json_files.write_json_atomic(summary_path, summary)
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


def _first_interval_metrics(workdir: str, metrics: dict[str, float]
                            ) -> dict[str, float]:
  """The first log interval's metrics, kept in the workdir across restarts."""
  path = os.path.join(workdir, "first_interval_metrics.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  if jax.process_index() == 0:
    json_files.write_json_atomic(path, metrics)
  return metrics


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
