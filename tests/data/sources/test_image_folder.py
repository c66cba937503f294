"""eqco_jax.data.sources.image_folder: an image folder's batches, the same
for any process count and resumed without reading an unused file; labels
required where evaluation needs them; a folder in a bucket."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import tensorflow as tf

from helpers import folder_config
from eqco_jax.core.errors import UserError
from eqco_jax.data import pipeline
from eqco_jax.data import sources
from eqco_jax.data.sources import Split
from eqco_jax.program.files.workdir import Workdir


def test_batches_are_the_same_for_any_process_count_and_count_the_truncated(
    image_folder):
  config = folder_config(image_folder.root)

  def batches(index, count, start_step=0, device_count=4):
    return pipeline.pretrain_dataset(
        sources.get_source(config), start_step=start_step,
        process_index=index, process_count=count,
        device_count=device_count).take(9 - start_step).as_numpy_iterator()

  # 1 x 4 and 2 x 2 devices: the same global batches, the truncated JPEG's
  # place taken by the other image of its device's 2 rows in both.
  whole = list(batches(0, 1))
  halves = [list(batches(i, 2)) for i in range(2)]
  for step, batch in enumerate(whole):
    for name in ("skipped", "view1", "view2"):
      np.testing.assert_array_equal(batch[name], np.concatenate(
          [halves[0][step][name], halves[1][step][name]]))
  # Without the device count the place is taken within the process's rows,
  # which differ between the layouts (the row of the 2-process run's part).
  assert any(
      not np.array_equal(b["view1"], np.concatenate(
          [h0["view1"], h1["view1"]]))
      for b, h0, h1 in zip(whole, *[list(batches(i, 2, device_count=None))
                                    for i in range(2)]))
  resumed = list(batches(0, 1, start_step=5))
  for batch, expected in zip(resumed, whole[5:]):
    np.testing.assert_array_equal(batch["view1"], expected["view1"])
  # 4 epochs of 36 images at batch 8 (4 steps each, 4 images left out of
  # each): the truncated JPEG is in the batches of most epochs, each time
  # named once, its place taken by another image of its batch.
  skipped = [name.decode() for b in whole for name in b["skipped"] if name]
  assert skipped and set(skipped) == {image_folder.truncated}
  assert len(skipped) == sum(
      image_folder.truncated.encode() in b["skipped"] for b in whole)


def _record(path: tf.Tensor, read: list[str]) -> tf.Tensor:
  """Reads ``path``, appending it to ``read`` (a side effect in Python)."""
  def note(p: bytes) -> np.ndarray:
    read.append(p.decode())
    return np.zeros((), np.int64)

  noted = tf.numpy_function(note, [path], tf.int64, stateful=True)
  with tf.control_dependencies([noted]):
    return tf.io.read_file(path)


def test_a_resume_reads_no_file_it_does_not_use(tmp_path, monkeypatch):
  root = tmp_path / "many"
  for i in range(200):
    path = root / "train" / f"c{i % 2}" / f"{i:03d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tf.io.encode_png(np.full((4, 4, 3), i % 256,
                                              np.uint8)).numpy())
  config = folder_config(root, batch_size=4)
  source = sources.get_source(config)
  options = dict(global_batch_size=4, shuffle_seed=7, process_index=0,
                 process_count=1)
  order = [e["id"].decode() for e in source.train_stream(
      Split("train"), start_step=0, **options).take(200).as_numpy_iterator()]
  assert sorted(order) == source.images("train")  # one epoch: every image

  read = []
  monkeypatch.setattr(sources.image_folder, "read_image_file",
                      lambda path, *, url: _record(path, read))
  resumed = source.train_stream(Split("train"), start_step=30, **options)
  first = [e["id"].decode() for e in resumed.take(4).as_numpy_iterator()]
  assert first == order[120:124]
  used_later = set(order[120:])
  names = {p.rsplit("/train/", 1)[1] for p in read}
  assert names and names <= used_later, sorted(names - used_later)[:5]


def test_evaluation_without_labels_is_refused_in_one_sentence(tmp_path):
  for i in range(3):
    path = tmp_path / "train" / f"{i}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tf.io.encode_jpeg(np.zeros((8, 8, 3), np.uint8)).numpy())
  source = sources.get_source(folder_config(tmp_path, batch_size=2))
  assert source.num_examples(source.split(sources.PRETRAIN)) == 3
  with pytest.raises(UserError) as error:
    pipeline.num_eval_examples(source, "train")
  message = str(error.value)
  assert message.count(". ") == 0 and message.endswith(".")
  assert "need labelled images" in message and "/CLASS/" in message
  assert "config.final_eval=False" in message


def test_a_folder_in_a_bucket_is_listed_and_read_like_a_local_one(
    image_folder, emulator):
  import gcs_emulator  # pylint: disable=g-import-not-at-top
  for path in sorted(image_folder.root.rglob("*")):
    if path.is_file():
      gcs_emulator.write_object(
          emulator, f"folder/{path.relative_to(image_folder.root)}",
          path.read_bytes())
  local = sources.get_source(folder_config(image_folder.root))
  remote = sources.get_source(folder_config(
      f"gs://{gcs_emulator.BUCKET}/folder"))
  for folder in ("train", "val"):
    assert remote.images(folder) == local.images(folder)
  batch = next(pipeline.pretrain_dataset(remote).as_numpy_iterator())
  expected = next(pipeline.pretrain_dataset(local).as_numpy_iterator())
  np.testing.assert_array_equal(batch["view1"], expected["view1"])


def _png(path, value: int, size: int = 4) -> None:
  """A PNG of ``size`` x ``size`` noise around ``value``."""
  noise = np.random.default_rng(value).integers(0, 32, (size, size, 3))
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(tf.io.encode_png((noise + value).astype(np.uint8)).numpy())


def _kept_source(config, workdir, *, trained: bool):
  """The source of a run in ``workdir`` as the training loop opens it:
  lists kept there, trusted once the run has a checkpoint (``trained``)."""
  return sources.get_source(config, keep_list=functools.partial(
      Workdir(workdir).keep_file_list, process_index=0, trust_kept=trained))


def test_a_start_refused_for_unlabelled_images_runs_once_they_are_moved_as_asked(
    tmp_path):
  """Images directly in ROOT/train, evaluation on: the sentence asks for
  class folders; moved there, the same command (still no checkpoint, so
  its kept list is not trusted) lists the folder again and starts. A run
  that had trained would read its kept list: the folder as it was."""
  root, workdir = tmp_path / "data", tmp_path / "run"
  for i in range(4):
    _png(root / "train" / f"{i}.png", 60 * i)
    _png(root / "val" / f"c{i % 2}" / f"{i}.png", 60 * i)
  config = folder_config(root, batch_size=2)
  source = _kept_source(config, workdir, trained=False)
  with pytest.raises(UserError) as error:
    source.require(sources.PRETRAIN, sources.EVAL_TRAIN, sources.EVAL_TEST)
  assert str(error.value) == (
      "The kNN monitor and the linear evaluation need labelled images, and "
      f"{root}/train has none in class folders; put them in {root}/train/"
      "CLASS/, or pretrain without evaluation (config.final_eval=False, "
      "config.eval_every_steps=-1).")
  for i in range(4):  # as the sentence asks
    (root / "train" / f"c{i % 2}").mkdir(exist_ok=True)
    (root / "train" / f"{i}.png").rename(root / "train" / f"c{i % 2}" /
                                         f"{i}.png")
  source = _kept_source(config, workdir, trained=False)
  source.require(sources.PRETRAIN, sources.EVAL_TRAIN, sources.EVAL_TEST)
  assert source.images("train") == [f"c{i % 2}/{i}.png" for i in (0, 2, 1, 3)]
  assert source.facts.num_classes == 2
  kept = _kept_source(config, workdir, trained=True)
  assert kept.images("train") == source.images("train")  # kept again, now
  (workdir / "file_lists" / "train.json").write_text(
      json.dumps([[f"{i}.png", 1] for i in range(4)]))
  assert _kept_source(config, workdir, trained=True).images("train") == [
      f"{i}.png" for i in range(4)]


def test_a_file_changed_since_the_run_listed_it_is_skipped_and_named_once(
    tmp_path):
  """An image rewritten under its name with another size between a run and
  its resume (the kept list holds each file's size) is left out of every
  batch of the resume and named once in its batch, like an unreadable
  one; a run that lists the folder anew reads it."""
  root, workdir = tmp_path / "data", tmp_path / "run"
  for i in range(8):
    _png(root / "train" / f"c{i % 2}" / f"{i}.png", 30 * i)
  config = folder_config(root, batch_size=4)
  listed = _kept_source(config, workdir, trained=False).images("train")
  changed = "c1/3.png"
  before = (root / "train" / changed).stat().st_size
  _png(root / "train" / changed, 90, size=6)  # same name, another size
  assert (root / "train" / changed).stat().st_size != before

  def skipped(source) -> list[str]:  # over one epoch: 2 steps of 4
    return [name.decode() for b in pipeline.pretrain_dataset(
        source).take(2).as_numpy_iterator() for name in b["skipped"] if name]

  resumed = _kept_source(config, workdir, trained=True)
  assert resumed.images("train") == listed
  assert skipped(resumed) == [changed]
  kept = json.loads((workdir / "file_lists" / "train.json").read_text())
  assert [changed, before] in kept  # what the resume compares
