"""Pipelines: determinism, per-process batches, padding, TFDS, global arrays."""

import numpy as np
import pytest

from eqco_jax.core import sharding
from eqco_jax.core.errors import UserError
from eqco_jax.data import catalog
from eqco_jax.data import pipeline
from eqco_jax.data import sources
from eqco_jax.data.sources import Split

import helpers


def _digits(**overrides):
  config = helpers.data_config()
  config.batch_size = 64
  config.eval_batch_size = 96
  config.update(overrides)
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


# -------------------------------------------------- determinism (digits).


def test_same_seed_and_step_same_batch_other_step_other_batch():
  config = _digits()
  run = _take(helpers.pretrain_numpy(config), 4)
  again = _take(helpers.pretrain_numpy(config), 4)
  for a, b in zip(run, again):
    np.testing.assert_array_equal(a["view1"], b["view1"])
    np.testing.assert_array_equal(a["view2"], b["view2"])
  assert not np.array_equal(run[0]["view1"], run[1]["view1"])
  other_seed = next(helpers.pretrain_numpy(_digits(seed=1)))
  assert not np.array_equal(run[0]["view1"], other_seed["view1"])


def test_resumed_iterator_sees_the_batches_it_would_have_seen():
  config = _digits(batch_size=800, image_size=8)  # 5 steps per epoch.
  source = sources.get_source(config)
  assert source.steps_per_epoch(Split("train"), config.batch_size) == 5
  run = _take(helpers.pretrain_numpy(config), 7)
  for start in (3, 6):
    resumed = next(helpers.pretrain_numpy(config, start_step=start))
    np.testing.assert_array_equal(resumed["view1"], run[start]["view1"])
    np.testing.assert_array_equal(resumed["view2"], run[start]["view2"])


def test_in_memory_global_batch_does_not_depend_on_process_count():
  config = _digits()
  whole = next(helpers.pretrain_numpy(
      config, start_step=2, process_index=0, process_count=1))
  for count in (2,):
    parts = [next(helpers.pretrain_numpy(
        config, start_step=2, process_index=i, process_count=count))
             for i in range(count)]
    for view in ("view1", "view2"):
      np.testing.assert_array_equal(
          np.concatenate([p[view] for p in parts]), whole[view])


def test_eval_single_pass_pads_and_masks_and_covers_the_split():
  config = _digits(eval_batch_size=96)  # 1000 = 10 x 96 + 40.
  whole = list(helpers.eval_numpy(
      config, split="test", augment=False, process_index=0, process_count=1))
  assert len(whole) == 11
  assert sum(b["mask"].sum() for b in whole) == 1000
  assert whole[-1]["mask"].sum() == 40 and not whole[-1]["mask"][40:].any()
  assert whole[-1]["image"][40:].max() == 0
  images, labels = sources.get_source(config).arrays("test")
  np.testing.assert_array_equal(
      np.concatenate([b["image"] for b in whole])[:1000], images)
  np.testing.assert_array_equal(
      np.concatenate([b["label"] for b in whole])[:1000], labels)
  parts = [list(helpers.eval_numpy(
      config, split="test", augment=False, process_index=i, process_count=3))
           for i in range(3)]
  assert [len(p) for p in parts] == [11, 11, 11]
  for step in range(11):
    merged = np.concatenate([p[step]["image"] for p in parts])
    np.testing.assert_array_equal(merged, whole[step]["image"])


def test_linear_eval_train_is_labelled_infinite_and_deterministic():
  config = _digits(eval_batch_size=1000)
  batches = _take(helpers.eval_numpy(
      config, split="train", augment=True), 5)  # Past the 4-step epoch.
  first = batches[0]
  assert first["image"].shape == (1000, 32, 32, 3) and first["mask"].all()
  assert first["label"].dtype == np.int32
  np.testing.assert_array_equal(np.bincount(
      np.concatenate([b["label"] for b in batches[:4]])), [400] * 10)
  resumed = next(helpers.eval_numpy(
      config, split="train", augment=True, start_step=4))
  np.testing.assert_array_equal(resumed["image"], batches[4]["image"])
  with pytest.raises(UserError, match="'train' or 'test'"):
    helpers.eval_numpy(config, split="val", augment=False)


def test_on_device_mode_leaves_only_crop_and_flip_to_the_host():
  on_device = _digits()
  on_device.augment.on_device = True
  no_color = _digits()
  no_color.augment.update(color_jitter_prob=0.0, grayscale_prob=0.0,
                           blur_prob=0.0)
  a = next(helpers.pretrain_numpy(on_device))
  b = next(helpers.pretrain_numpy(no_color))
  assert set(a) == {"view1", "view2", "skipped"}  # No colour parameters.
  np.testing.assert_array_equal(a["view1"], b["view1"])
  np.testing.assert_array_equal(a["view2"], b["view2"])


def test_batch_size_must_split_over_processes():
  with pytest.raises(UserError, match="not divisible by the 3 processes"):
    helpers.pretrain_numpy(_digits(), process_index=0, process_count=3)


# ------------------------------------------ global arrays over the mesh.


def test_global_arrays_are_sharded_on_the_data_axis():
  mesh = sharding.make_mesh()
  config = _digits()
  source = sources.get_source(config)
  batch = next(pipeline.pretrain_batches(source, mesh))
  local = next(helpers.pretrain_numpy(config))
  assert batch["view1"].shape == (64, 32, 32, 3)
  assert batch["view1"].dtype == np.uint8
  assert batch["view1"].sharding.is_equivalent_to(
      sharding.batch_sharding(mesh), 4)
  np.testing.assert_array_equal(np.asarray(batch["view2"]), local["view2"])
  evals = list(pipeline.eval_batches(source, mesh, split="test",
                                     augment=False, batch_size=96))
  assert len(evals) == 11 and int(sum(b["mask"].sum() for b in evals)) == 1000
  assert evals[0]["label"].sharding.is_equivalent_to(
      sharding.batch_sharding(mesh), 1)
  with pytest.raises(ValueError, match="divisible by the 8 devices"):
    pipeline.pretrain_batches(sources.get_source(_digits(batch_size=60)),
                              mesh)


# ------------------------------------------------------------------ TFDS.


def _cifar(data_dir, **overrides):
  return _digits(dataset="cifar10", data_dir=data_dir, batch_size=10,
                 eval_batch_size=6, shuffle_buffer=100, **overrides)


def test_tfds_pretraining_batches_resume_across_epochs(fake_tfds_dir):
  config = _cifar(fake_tfds_dir)
  config.augment.update(on_device=True, crop_scale=(1.0, 1.0),
                        crop_ratio=(1.0, 1.0), flip_prob=0.0)
  run = _take(helpers.pretrain_numpy(config), 12)
  assert run[0]["view1"].shape == (10, 32, 32, 3)
  # Identity augmentation: views are the stored images, epochs of 5 steps.
  epochs = [sorted(sum((helpers.example_ids(b["view1"])
                        for b in run[e:e + 5]), [])) for e in (0, 5)]
  assert epochs[0] == epochs[1] == list(range(50))
  order = [helpers.example_ids(b["view1"]) for b in run]
  assert order[:5] != order[5:10]  # Each epoch its own shuffle.
  for start in (3, 11):
    resumed = next(helpers.pretrain_numpy(config, start_step=start))
    np.testing.assert_array_equal(resumed["view1"], run[start]["view1"])


def test_tfds_eval_pass_masks_padding_across_processes(fake_tfds_dir):
  config = _cifar(fake_tfds_dir)  # Test split: 23 examples, batch 6.
  assert pipeline.num_eval_examples(sources.get_source(config), "test") == 23
  parts = [list(helpers.eval_numpy(
      config, split="test", augment=False, process_index=i, process_count=3))
           for i in range(3)]
  assert [len(p) for p in parts] == [4, 4, 4]  # ceil(23 / 6) for everyone.
  ids, labels = [], []
  for part in parts:
    for batch in part:
      assert batch["image"].shape == (2, 32, 32, 3)
      ids += helpers.example_ids(batch["image"][batch["mask"]])
      labels += list(batch["label"][batch["mask"]])
      assert not batch["image"][~batch["mask"]].any()
  assert sorted(ids) == list(range(23))
  assert labels == [i % 10 for i in ids]


@pytest.fixture
def mock_imagenette(tmp_path):
  """tfds.testing.mock_data for imagenette, 16 examples in each split.

  The mock yields ``num_examples`` for any split; the metadata agrees.
  """
  with helpers.mocked_tfds("imagenette", tmp_path, ("train", "validation"),
                           16) as data_dir:
    yield data_dir


def test_imagenette_jpegs_through_the_real_pipeline(mock_imagenette):
  config = _digits(dataset="imagenette", data_dir=mock_imagenette,
                   image_size=24, batch_size=8, eval_batch_size=6,
                   shuffle_buffer=16)
  info = sources.get_source(config).info
  assert (info.num_train_examples, info.num_classes) == (16, 10)
  assert info.mean == catalog.IMAGENET_MEAN
  assert info.eval_crop_fraction == 0.875
  batch = next(helpers.pretrain_numpy(config))
  assert batch["view1"].shape == (8, 24, 24, 3)
  assert np.any(batch["view1"] != batch["view2"])
  evals = list(helpers.eval_numpy(config, split="test",
                                           augment=False))
  mask = np.concatenate([b["mask"] for b in evals])
  assert len(evals) == 3 and mask.sum() == 16
  train = next(helpers.eval_numpy(config, split="train",
                                           augment=True))
  assert train["image"].shape == (6, 24, 24, 3)
  assert set(train["label"]) <= set(range(10))
