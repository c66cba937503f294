"""Linear evaluation of a pretraining run's backbone (docs/method.md,
section 4).

Reads the newest checkpoint of ``config.pretrain_workdir`` (its
``config.json`` tells the model), freezes the online backbone with BN in
inference mode and trains one linear layer with SGD (lr 30, momentum 0.9,
no weight decay, step decay). Two modes:

- ``precompute_features``: features of the un-augmented train split are
  extracted once and the layer is trained on them (small datasets).
- otherwise the protocol itself: augmented images (RandomResizedCrop 0.08-1 +
  flip) through the frozen backbone every step, checkpointed and resumable.

With ``config.init_from`` (a torchvision ResNet ``.pth``/``.safetensors``)
instead of ``pretrain_workdir``, the backbone and its architecture come from
that file and the data fields from
:func:`eqco_jax.core.config.default_config` (ImageNet at 224) under this
config's data fields (``EVAL_DATA_FIELDS``: those it sets).

Writes ``workdir/linear_eval.json`` with top-1 and top-5 on the test split.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, NamedTuple

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from clu import periodic_actions

from eqco_jax.core import config as config_lib
from eqco_jax.core import device_augment
from eqco_jax.core import models
from eqco_jax.core import sharding
from eqco_jax.core.errors import UserError
from eqco_jax.core.evaluate import features as features_lib
from eqco_jax.core.evaluate import linear_eval_features
from eqco_jax.core.evaluate import linear_eval_images
from eqco_jax.core.training import builders
from eqco_jax.core.types import PyTree
from eqco_jax.data import catalog
from eqco_jax.data import pipeline
from eqco_jax.data import sources
from eqco_jax.program.files import checkpointing
from eqco_jax.program.files import events
from eqco_jax.program.files import workdir as workdir_lib
from eqco_jax.program.files.workdir import Workdir
from eqco_jax.program.run import fit
from eqco_jax.program.run import pacing
from eqco_jax.program.run import stopping
from eqco_jax.program.torchvision import reading as pretrained

# The data fields a linear evaluation may set; unset, the pretraining run's.
EVAL_DATA_FIELDS = ("dataset", "data_dir", "image_size", "eval_train_split",
                    "eval_test_split", "mean", "std")


def eval_data_fields(config: ml_collections.ConfigDict,
                     pretrain: ml_collections.ConfigDict) -> catalog.DataFields:
  """The pretraining run's data fields with this evaluation's on top."""
  fields = catalog.DataFields.of(pretrain)
  chosen = {field: getattr(catalog.DataFields.of(config), field)
            for field in EVAL_DATA_FIELDS
            if config.get(field) not in (None, ())}
  return fields.replace(**chosen, seed=config.seed)


def imported_model_config(config: ml_collections.ConfigDict
                          ) -> ml_collections.ConfigDict:
  """The default pretraining config with the architecture of the file
  ``config.init_from`` (which stands in for a pretraining run's config)."""
  if config.get("pretrain_workdir"):
    raise UserError("config.pretrain_workdir and config.init_from are both "
                    "set; evaluate either a pretraining run or a file.")
  model = config_lib.default_config()
  model.update(pretrained.file_architecture(config.init_from))
  return model


def pretrain_config(config: ml_collections.ConfigDict
                    ) -> ml_collections.ConfigDict:
  """The config of what ``config`` evaluates: the pretraining run's, or the
  default one with the architecture of the ``init_from`` file."""
  if config.get("init_from"):
    return imported_model_config(config)
  return workdir_lib.of_run(config.pretrain_workdir).read_run_config()


def restore_pretrained(pretrain_workdir: Workdir, mesh: jax.sharding.Mesh
                       ) -> tuple[PyTree, PyTree, int]:
  """``(params, batch_stats, step)`` of the run's newest checkpoint,
  replicated on ``mesh``; the run's checkpoints are opened read-only."""
  state = checkpointing.load_state_arrays(pretrain_workdir)
  replicated = sharding.replicated(mesh)
  return (sharding.place(state["params"], replicated),
          sharding.place(state["batch_stats"], replicated),
          int(state["step"]))


def restore_imported(path: str, model: ml_collections.ConfigDict,
                     backbone: models.ResNet, mesh: jax.sharding.Mesh
                     ) -> PyTree:
  """The backbone variables of the torchvision file ``path``, checked
  against ``backbone`` (``model``'s) and replicated on ``mesh``."""
  expected = pretrained.backbone_shapes(backbone, model.image_size)
  return sharding.place(pretrained.load_backbone(path, expected, model.model),
                        sharding.replicated(mesh))


def run(config: ml_collections.ConfigDict, workdir: Workdir
        ) -> dict[str, Any]:
  """Runs the linear evaluation; returns and writes its results (an empty
  dict when a signal stopped it: the image-level protocol's checkpoint is
  saved, and the same command resumes)."""
  mesh = sharding.make_mesh()
  config_lib.validate_linear_eval(config, "")
  init_from = config.get("init_from")
  pretrain = pretrain_config(config)
  sharding.check_divisible(config.batch_size, mesh)
  sharding.check_divisible(config.eval_batch_size, mesh)
  fields = eval_data_fields(config, pretrain)
  for batch in (config.batch_size, config.eval_batch_size):
    fit.check_evaluation(batch, fields.image_size, mesh.devices.size,
                         jax.local_devices()[0])
  workdir = workdir_lib.prepare(workdir)
  source = sources.get_source(fields, keep_list=functools.partial(
      workdir.keep_file_list, process_index=jax.process_index(),
      agree=sharding.broadcast_text))
  backbone = builders.backbone_of(pretrain)
  if init_from:
    variables = restore_imported(init_from, pretrain, backbone, mesh)
    pretrain_step = None
    logging.info("Evaluating the %s backbone of %s.", pretrain.model,
                 init_from)
  else:
    params, batch_stats, pretrain_step = restore_pretrained(
        workdir_lib.of_run(config.pretrain_workdir), mesh)
    variables = features_lib.backbone_variables(params, batch_stats)
    logging.info("Evaluating the backbone of %s at step %d.",
                 config.pretrain_workdir, pretrain_step)
  frozen = _FrozenBackbone(
      features_lib.backbone_apply_fn(backbone), variables,
      functools.partial(device_augment.normalize, mean=source.info.mean,
                        std=source.info.std), backbone.num_features)
  protocol = dict(epochs=config.epochs, batch_size=config.batch_size,
                  learning_rate=config.learning_rate,
                  momentum=config.momentum, weight_decay=config.weight_decay,
                  decay_epochs=tuple(config.decay_epochs))
  if config.precompute_features:
    try:
      results, skipped = _train_on_features(config, source, mesh, frozen,
                                            protocol)
    except KeyboardInterrupt:  # minutes of work, nothing to save on the way
      logging.info("Stopped after SIGINT; nothing is saved, run the same "
                   "command to start again.")
      return {}
  else:
    results, skipped = _train_on_images(config, source, workdir, mesh,
                                        frozen)
    if not results:  # stopped by a signal, its checkpoint saved
      return {}
  results = {k: float(v) for k, v in results.items()}
  results["eval_skipped_records"] = skipped
  results.update(pretrain_workdir=config.pretrain_workdir,
                 pretrain_step=pretrain_step, **protocol)
  if init_from:
    results.update(init_from=init_from, model=pretrain.model)
  if jax.process_index() == 0:
    workdir.write_run_file(workdir_lib.LINEAR_EVAL, results)
  return results


class _FrozenBackbone(NamedTuple):
  """The backbone under evaluation: its inference-mode apply function, its
  variables, the input normalisation and the width of its features."""
  apply: features_lib.ApplyBackbone
  variables: PyTree
  normalize: features_lib.Normalize
  num_features: int


def _train_on_features(config: ml_collections.ConfigDict,
                       source: sources.Source, mesh: jax.sharding.Mesh,
                       frozen: _FrozenBackbone, protocol: dict[str, Any]
                       ) -> tuple[dict[str, Any], int]:
  """The layer trained on features extracted once: ``(results, the images
  left out as unreadable)``."""
  extract = lambda split: features_lib.extract_features(
      frozen.apply, frozen.variables,
      pipeline.eval_batches(source, mesh, split=split, augment=False,
                            batch_size=config.eval_batch_size),
      frozen.normalize)
  (train_x, train_y), (test_x, test_y) = extract("train"), extract("test")
  results = linear_eval_features.linear_eval_on_features(
      train_x, train_y, test_x, test_y,
      num_classes=source.info.num_classes,
      rng=jax.random.key(config.seed), standardize=config.standardize,
      **protocol)
  skipped = sum(pipeline.num_eval_examples(source, split) - len(x)
                for split, x in (("train", train_x), ("test", test_x)))
  return results, skipped


# Besides every config.checkpoint_every_steps, the image-level protocol
# saves once this long has passed since its last checkpoint (orbax decides
# on process 0, for every process): a kill loses minutes of it at most.
CHECKPOINT_EVERY_SECS = 300

# Said once when the image-level protocol runs on a CPU.
CPU_NOTE = ("Note: the image-level linear evaluation runs the backbone on "
            "every augmented batch, which takes hours on a CPU; "
            "--config=configs/linear_eval.py:features trains the same "
            "linear layer on features extracted once (without "
            "augmentation), far faster.")


def create_manager(workdir: Workdir, config: ml_collections.ConfigDict
                   ) -> checkpointing.Manager:
  """The image-level protocol's checkpoints in ``workdir``: the newest
  ``config.keep_checkpoints``, saved every ``config.checkpoint_every_steps``
  and every CHECKPOINT_EVERY_SECS (and at the step of a preemption notice,
  which :class:`stopping.StopRequests` asks for)."""
  policies = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints,
      save_decision_policy=policies.AnySavePolicy([
          policies.FixedIntervalPolicy(config.checkpoint_every_steps),
          policies.PreemptionCheckpointingPolicy(),
          policies.ContinuousCheckpointingPolicy(
              minimum_interval_secs=CHECKPOINT_EVERY_SECS)]))
  return checkpointing.Manager(workdir.checkpoints, options=options)


def _train_on_images(config: ml_collections.ConfigDict,
                     source: sources.Source,
                     workdir: Workdir, mesh: jax.sharding.Mesh,
                     frozen: _FrozenBackbone) -> tuple[dict[str, Any], int]:
  """The image-level protocol: augmented batches through the frozen net,
  checkpointed in ``workdir`` and resumable. Returns ``(results, the test
  images left out as unreadable)``; ``({}, 0)`` when a SIGTERM or a SIGINT
  stopped it (its step saved; in the test evaluation, its training)."""
  manager = create_manager(workdir, config)
  # From here on a signal stops the run at the end of its next step.
  with stopping.StopRequests(manager) as stop:
    if jax.devices()[0].platform == "cpu":
      logging.warning("%s", CPU_NOTE)
    state, writer = _train(config, source, workdir, mesh, frozen, manager,
                           stop)
    if state is None:
      return {}, 0
    stop.what_now, stop.what_now_together = (
        "stopping the test evaluation",
        "the test evaluation goes on to its end on every process")
    try:
      results = linear_eval_images.evaluate_classifier(
          frozen.apply, frozen.variables, state.params, stopping.checked(
              pipeline.eval_batches(source, mesh, split="test",
                                    augment=False,
                                    batch_size=config.eval_batch_size),
              stop), frozen.normalize)
    except stopping.Interrupted as signal_name:
      logging.info("Stopped in the test evaluation after %s; the training "
                   "is saved, run the same command to evaluate it.",
                   signal_name)
      return {}, 0
  writer.write_scalars(int(state.step), {
      k: v for k, v in results.items() if k != "examples"})
  writer.flush()
  # Training images that could not be read were masked out of their step.
  skipped = pipeline.num_eval_examples(source, "test") - int(
      results.pop("examples"))
  return results, skipped


def _train(config: ml_collections.ConfigDict, source: sources.Source,
           workdir: Workdir, mesh: jax.sharding.Mesh,
           frozen: _FrozenBackbone, manager: checkpointing.Manager,
           stop: stopping.StopRequests) -> tuple[Any, Any]:
  """Trains the linear layer from ``manager``'s newest checkpoint, if any:
  ``(its state, the run's event writer)``, the state None when ``stop``
  stopped it (its step saved)."""
  num_classes = source.info.num_classes
  steps_per_epoch = source.steps_per_epoch(
      pipeline.eval_split(source, "train"), config.batch_size)
  total_steps = config.epochs * steps_per_epoch
  schedule = linear_eval_features.linear_eval_schedule(
      config.learning_rate, steps_per_epoch, tuple(config.decay_epochs))
  tx = linear_eval_features.linear_eval_optimizer(
      schedule, momentum=config.momentum, weight_decay=config.weight_decay)
  state = jax.jit(
      functools.partial(linear_eval_images.create_linear_eval_state,
                        num_features=frozen.num_features,
                        num_classes=num_classes, tx=tx),
      out_shardings=sharding.replicated(mesh))(jax.random.key(config.seed))
  if manager.latest_step() is not None:
    state = manager.restore(
        manager.latest_step(), args=ocp.args.StandardRestore(
            jax.tree.map(ocp.utils.to_shape_dtype_struct, state)))
  step_fn = linear_eval_images.jit_linear_train_step(
      linear_eval_images.make_linear_train_step(
          frozen.apply, tx, num_classes, frozen.normalize, schedule), mesh)
  first = int(state.step)
  if first:
    logging.info("Resumed from the checkpoint of step %d.", first)
  writer = events.create_writer(workdir, resumed_from=first,
                                just_logging=jax.process_index() > 0)
  # Counts steps dispatched, at most STEPS_IN_FLIGHT ahead of those done
  # (unpaced, the host ran tens of steps ahead: a count that raced, then
  # crawled).
  progress = periodic_actions.ReportProgress(num_train_steps=total_steps,
                                             writer=writer)
  batches = pipeline.eval_batches(source, mesh, split="train", augment=True,
                                  batch_size=config.batch_size,
                                  start_step=first)
  with contextlib.closing(pacing.Pacer()) as pacer:
    for done in range(first + 1, total_steps + 1):
      state, metrics = step_fn(state, next(batches), frozen.variables)
      pacer.dispatched(done, metrics)
      progress(done)
      if done % config.log_every_steps == 0:
        writer.write_scalars(done, jax.device_get(metrics))
      stop_now = done < total_steps and stop.at(done)
      manager.save(done, args=ocp.args.StandardSave(state),
                   force=done == total_steps or stop_now)
      if stop_now:
        manager.wait_until_finished()
        writer.flush()
        logging.info("Stopped at step %d of %d after %s; the checkpoint is "
                     "saved, run the same command to resume.", done,
                     total_steps, stop.reason)
        stopping.park(batches)
        return None, writer
  manager.wait_until_finished()
  return state, writer


def results_line(results: dict[str, Any]) -> str:
  """The evaluation's result in one line."""
  return (f"linear evaluation: top-1 {results['top1']:.4f}, "
          f"top-5 {results['top5']:.4f}")
