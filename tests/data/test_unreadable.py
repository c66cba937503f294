"""A truncated JPEG in a TFDS shard: skipped in place, reported, never
fatal (the count in a run's summary: scenarios/test_pretraining.py)."""

import jax
import numpy as np
import pytest

import helpers
from eqco_jax.core import sharding
from eqco_jax.data import pipeline
from eqco_jax.data import sources


def _source(data_dir, **overrides) -> sources.Source:
  config = helpers.data_config()
  config.update(dataset="cifar10", data_dir=data_dir, batch_size=10,
                eval_batch_size=10, shuffle_buffer=50, **overrides)
  config.augment.on_device = True  # Views are the crops themselves.
  return sources.get_source(config)


def test_a_truncated_jpeg_is_skipped_in_place_and_resumes_exactly(jpeg_tfds):
  source = _source(jpeg_tfds.data_dir)
  batches = pipeline.pretrain_dataset(source).as_numpy_iterator()
  epoch = [next(batches) for _ in range(5)]  # 50 records: each once.
  skipped = [[r.decode() for r in b["skipped"] if r] for b in epoch]
  assert sum(skipped, []) == [jpeg_tfds.truncated_id]
  for batch, names in zip(epoch, skipped):
    assert batch["view1"].shape == (10, 32, 32, 3)
    rows = {(a.tobytes(), b.tobytes())
            for a, b in zip(batch["view1"], batch["view2"])}
    # The skipped record's place holds another example of its batch.
    assert len(rows) == 10 - len(names)
  step = [i for i, names in enumerate(skipped) if names][0]
  resumed = next(pipeline.pretrain_dataset(
      source, start_step=step).as_numpy_iterator())
  np.testing.assert_array_equal(resumed["view1"], epoch[step]["view1"])
  assert list(resumed["skipped"]) == list(epoch[step]["skipped"])
  reported = []
  global_batches = pipeline.pretrain_batches(
      source, sharding.make_mesh(jax.devices()[:2]),
      on_skipped=lambda *report: reported.append(report))
  for _ in range(5):
    assert set(next(global_batches)) == {"view1", "view2"}
  assert reported == [(step + 1, [jpeg_tfds.truncated_id])]


@pytest.mark.parametrize("augment", [False, True])
def test_evaluation_leaves_an_unreadable_image_out(jpeg_tfds, augment):
  batches = pipeline.eval_dataset(
      _source(jpeg_tfds.data_dir), split="train", augment=augment,
      batch_size=10).as_numpy_iterator()
  if augment:  # Infinite: one epoch of 5 batches holds each record once.
    batches = [next(batches) for _ in range(5)]
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.shape == (50,) and mask.sum() == 49


@pytest.mark.parametrize("group_size", [None, 1, 2, 4, 5])
def test_fill_rows_takes_the_next_readable_row_of_the_group(group_size):
  from eqco_jax.data import unreadable

  rng = np.random.default_rng(group_size or 0)
  for _ in range(20):
    readable = rng.random(10) < 0.5
    filled = unreadable.fill_rows({"row": np.arange(10)}, readable,
                                  group_size)["row"].numpy()
    size = group_size or 10
    for i in range(10):  # the reference: walk the group cyclically from i
      start = i - i % size
      group = range(start, min(start + size, 10))
      walk = [group[(i - start + k) % len(group)] for k in range(len(group))]
      expected = next((j for j in walk if readable[j]), i)
      assert filled[i] == expected, (readable, group_size, i)


def _jpeg(progressive: bool = False) -> bytes:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  image = np.random.default_rng(0).integers(0, 256, (64, 80, 3), np.uint8)
  return tf.io.encode_jpeg(image, progressive=progressive).numpy()


@pytest.mark.parametrize("cut", [
    lambda d: d[:len(d) * 2 // 5], lambda d: d[:-2], lambda d: d[:-1],
    lambda d: d[:100]])
def test_a_jpeg_cut_short_is_unreadable_for_every_crop(cut, capfd):
  """Even a crop above the cut, which TensorFlow's decoder would decode
  (half an image), and without its 'Premature end of JPEG data' line for
  a crop below it."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from eqco_jax.data import augment  # pylint: disable=g-import-not-at-top
  from eqco_jax.data import unreadable  # pylint: disable=g-import-not-at-top

  for progressive in (False, True):
    data = cut(_jpeg(progressive))
    for window in ((0, 0, 4, 4), (60, 0, 4, 80)):  # above, below the cut
      _, readable = unreadable.decode_or_flag(
          lambda d, w=window: tf.ensure_shape(augment.decode_and_crop(
              d, lambda _: w), (w[2], w[3], 3)), data)
      assert not readable
  assert "JPEG" not in capfd.readouterr().err


def test_a_whole_jpeg_passes_with_bytes_after_its_end():
  from eqco_jax.data import unreadable  # pylint: disable=g-import-not-at-top

  for data in (_jpeg(), _jpeg(progressive=True), _jpeg() + b"\0" * 9 + b"mp4"):
    assert unreadable.whole_jpeg(data).numpy() == data
