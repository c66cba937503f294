"""eqco_jax.program.run.backbone_eval: the kNN monitor and the final evaluation
of a run's backbone, on the run's own source, equal to the evaluation of
features brought to the host; the images it could not read, counted."""

import functools

import jax

from helpers import tiny_config
from eqco_jax.core import device_augment
from eqco_jax.core import sharding
from eqco_jax.core.evaluate import features as features_lib
from eqco_jax.core.evaluate import knn
from eqco_jax.core.evaluate import linear_eval_features
from eqco_jax.core.training import builders
from eqco_jax.data import pipeline
from eqco_jax.data import sources
from eqco_jax.program.run import backbone_eval


def _evaluator(data_dir: str):
  """``(config, source, mesh, initial state, evaluator)`` of a tiny SiMo
  run on the prepared 'cifar10' in ``data_dir``."""
  config = tiny_config("simo", dataset="cifar10", data_dir=data_dir,
                       image_size=32, eval_batch_size=8, knn_k=5)
  config.linear_eval.update(dict(epochs=3, batch_size=16))
  mesh = sharding.make_mesh()
  source = sources.get_source(config)
  run = builders.build_pretraining(config, steps_per_epoch=1)
  return (config, source, mesh, run.initial_state(mesh),
          backbone_eval.make_backbone_evaluator(config, run.backbone, source,
                                                mesh))


def test_the_sharded_evaluation_is_the_host_one(fake_tfds_dir):
  config, source, mesh, state, evaluate = _evaluator(fake_tfds_dir)
  monitor = evaluate(state.params, state.batch_stats, linear=False)
  final = evaluate(state.params, state.batch_stats, linear=True)

  variables = features_lib.backbone_variables(state.params, state.batch_stats)
  apply = features_lib.backbone_apply_fn(builders.backbone_of(config))
  normalize = functools.partial(device_augment.normalize,
                                mean=source.info.mean, std=source.info.std)
  train, test = (features_lib.extract_features(
      apply, variables, pipeline.eval_batches(
          source, mesh, split=split, augment=False, batch_size=8), normalize)
                 for split in ("train", "test"))
  assert (len(train[0]), len(test[0])) == (50, 23)  # padding left out
  expected_knn = knn.knn_accuracy(*train, *test, num_classes=10, k=5,
                                  temperature=config.knn_temperature)
  assert monitor == {"knn_top1": expected_knn, "eval_skipped_records": 0}
  expected = linear_eval_features.linear_eval_on_features(
      *train, *test, num_classes=10, rng=jax.random.key(config.seed),
      **config.linear_eval.to_dict())
  assert final == {"knn_top1": expected_knn, "eval_skipped_records": 0,
                   "linear_top1": expected["top1"],
                   "linear_top5": expected["top5"]}


def test_the_images_an_evaluation_could_not_read_are_counted(jpeg_tfds):
  *_, state, evaluate = _evaluator(jpeg_tfds.data_dir)
  monitor = evaluate(state.params, state.batch_stats, linear=False)
  assert monitor["eval_skipped_records"] == 1  # train record 7, truncated
