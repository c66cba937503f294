"""A truncated JPEG in a TFDS shard: skipped, counted, logged, never fatal."""

import json

import numpy as np
import pytest
import tensorflow as tf

from eqco_jax import config as config_lib
from eqco_jax.data import pipeline
from eqco_jax.data import sources

from helpers import run

TRUNCATED = 7  # The train record whose JPEG is cut short.


@pytest.fixture(scope="module")
def jpeg_tfds_dir(tmp_path_factory) -> str:
  """A prepared 'cifar10' (50 train / 20 test) whose images are JPEG bytes
  of random noise; train record 7 holds only the first 40% of its JPEG."""
  import tensorflow_datasets as tfds

  data_dir = str(tmp_path_factory.mktemp("jpeg_tfds"))
  features = tfds.builder("cifar10", data_dir=data_dir).info.features
  rng = np.random.default_rng(1)
  splits = {}
  for split, size in (("train", 50), ("test", 20)):
    images = [tf.io.encode_jpeg(rng.integers(0, 256, (32, 32, 3), np.uint8),
                                quality=90).numpy() for _ in range(size)]
    if split == "train":
      images[TRUNCATED] = images[TRUNCATED][:len(images[TRUNCATED]) * 2 // 5]
    # Bytes are stored as they are (the Image feature encodes only arrays).
    splits[split] = tf.data.Dataset.from_tensor_slices({
        "id": [f"{split}_{i}" for i in range(size)], "image": images,
        "label": np.arange(size) % 10})
  tfds.dataset_builders.TfDataBuilder(
      name="cifar10", version="3.0.2", split_datasets=splits,
      features=features, data_dir=data_dir).download_and_prepare()
  return data_dir


def _config(data_dir, **overrides):
  config = config_lib.data_config()
  config.update(dataset="cifar10", data_dir=data_dir, batch_size=10,
                eval_batch_size=10, shuffle_buffer=50, **overrides)
  config.augment.on_device = True  # Views are the crops themselves.
  return config


def _truncated_id(data_dir) -> str:
  """The record id of the truncated JPEG, found by decoding every record."""
  bad = []
  for record in sources.get_source(_config(data_dir)).records("train"):
    try:
      tf.io.decode_jpeg(record["image"])
    except tf.errors.InvalidArgumentError:
      bad.append(record["id"].numpy().decode())
  assert len(bad) == 1, bad  # (TFDS orders records by a hash of their key.)
  return bad[0]


def test_a_truncated_jpeg_is_skipped_in_place_and_resumes_exactly(
    jpeg_tfds_dir):
  bad_id = _truncated_id(jpeg_tfds_dir)
  config = _config(jpeg_tfds_dir)
  epoch = [next(it) for it in [pipeline.pretrain_batches_numpy(config)]
           for _ in range(5)]  # 50 records, 5 steps: each record once.
  skipped = [[r.decode() for r in b["skipped"] if r] for b in epoch]
  assert sum(skipped, []) == [bad_id]
  for batch, names in zip(epoch, skipped):
    assert batch["view1"].shape == (10, 32, 32, 3)
    rows = {(a.tobytes(), b.tobytes())
            for a, b in zip(batch["view1"], batch["view2"])}
    # The skipped record's place holds another example of its batch.
    assert len(rows) == 10 - len(names)
  step = [i for i, names in enumerate(skipped) if names][0]
  resumed = next(pipeline.pretrain_batches_numpy(config, start_step=step))
  np.testing.assert_array_equal(resumed["view1"], epoch[step]["view1"])
  assert list(resumed["skipped"]) == list(epoch[step]["skipped"])
  tally = pipeline.SkippedRecords()
  batches = pipeline.take_skipped(
      pipeline.pretrain_batches_numpy(config), 0, tally)
  for _ in range(5):
    assert "skipped" not in next(batches)
  assert tally.by_step == {step + 1: [bad_id]} and tally.count(5) == 1
  assert tally.count(step) == 0


@pytest.mark.parametrize("augment", [False, True])
def test_evaluation_leaves_an_unreadable_image_out(jpeg_tfds_dir, augment):
  config = _config(jpeg_tfds_dir)
  batches = pipeline.eval_batches_numpy(config, split="train",
                                        augment=augment)
  if augment:  # Infinite: one epoch of 5 batches holds each record once.
    batches = [next(batches) for _ in range(5)]
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.shape == (50,) and mask.sum() == 49


def test_a_run_counts_its_skipped_record_in_the_summary(tmp_path,
                                                        jpeg_tfds_dir):
  workdir = tmp_path / "run"
  result = run(workdir, "--config.dataset=cifar10",
               f"--config.data_dir={jpeg_tfds_dir}",
               "--config.batch_size=10", "--config.num_train_steps=5",
               "--config.checkpoint_every_steps=5",
               "--config.log_every_steps=5", "--config.final_eval=False")
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["skipped_records"] == 1 and summary["steps"] == 5
  bad_id = _truncated_id(jpeg_tfds_dir)
  assert "Skipped 1 unreadable record(s) in the batch of step" in (
      result.stderr)
  assert bad_id in result.stderr
  recorded = json.loads(
      (workdir / "skipped_records.process_0.json").read_text())
  assert sum(recorded.values(), []) == [bad_id]
