"""eqco_jax.program.files.events: the events a run writes, read back by
TensorBoard's own loaders: the file reader that holds a file open, the
Python loader of ``--load_fast=false`` (the multiplexer and its data
provider), a live ``tensorboard`` with its default loader (the data
server); a run killed and resumed: scenarios/test_pretraining.py."""

import itertools
import time

import gcs_emulator
import pytest
import tensorboard_loaders
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.plugins.hparams import plugin_data_pb2

from eqco_jax.program.files import events


def _clock(start=1.7e9):
  """A clock that advances 1 s per reading from ``start`` (its ``now``
  may be moved on)."""
  ticks = itertools.count()
  clock = lambda: clock.now + next(ticks)
  clock.now = start
  return clock


def _summaries(loader) -> list[tuple[int, float]]:
  return [(e.step, e.summary.value[0].simple_value)
          for e in loader.Load() if e.HasField("summary")
          and e.summary.value[0].tag == "loss"]


def test_one_file_appended_that_a_reader_holding_it_follows(tmp_path):
  writer = events.EventFileWriter(tmp_path)
  writer.write_hparams({"method": "simo", "batch_size": 256, "eqco": True})
  writer.write_scalars(10, {"loss": 7.5, "top1": 0.25})
  (path,) = tmp_path.iterdir()
  inode = path.stat().st_ino
  reader = event_file_loader.LegacyEventFileLoader(str(path))  # holds it
  assert _summaries(reader) == [(10, 7.5)]
  writer.write_scalars(20, {"loss": 7.0, "top1": 0.5})  # no flush
  assert _summaries(reader) == [(20, 7.0)]
  writer.flush()
  assert list(tmp_path.iterdir()) == [path]
  assert path.stat().st_ino == inode  # the same file, grown
  (content,) = _loaded(tmp_path).PluginTagToContent("hparams").values()
  hparams = plugin_data_pb2.HParamsPluginData.FromString(
      content).session_start_info.hparams
  assert (hparams["method"].string_value, hparams["batch_size"].number_value,
          hparams["eqco"].bool_value) == ("simo", 256, True)
  with pytest.raises(NotImplementedError, match="scalars and hyperparameters"):
    writer.write_images(1, {})


def _loaded(folder) -> event_accumulator.EventAccumulator:
  loader = event_accumulator.EventAccumulator(str(folder))
  loader.Reload()
  return loader


def test_a_new_file_by_size_or_by_day_named_after_the_one_before(tmp_path):
  clock = _clock()
  writer = events.EventFileWriter(tmp_path, max_bytes=1000, clock=clock)
  for step in range(10, 200, 10):  # past 1000 bytes: a second file
    writer.write_scalars(step, {"loss": step / 100, "top1": 0.5})
  names = sorted(p.name for p in tmp_path.iterdir())
  assert len(names) == 2
  assert all(p.stat().st_size <= 1000 for p in tmp_path.iterdir())
  clock.now += events.DAY
  writer.write_scalars(200, {"loss": 2.0})  # a day on: a third file
  writer.write_scalars(210, {"loss": 2.1})
  writer.close()
  files = sorted(tmp_path.iterdir())
  assert [p.name for p in files[:2]] == names and len(files) == 3
  assert files[2].stat().st_size < 300
  # Named in the order written: TensorBoard reads them in that order.
  created = [int(p.name.split(".")[3]) for p in files]
  assert created == sorted(created) and created[2] >= clock.now
  assert [(e.step, e.value) for e in _loaded(tmp_path).Scalars("loss")] == [
      (step, pytest.approx(step / 100)) for step in range(10, 220, 10)]


def test_a_resumed_run_replaces_what_the_killed_one_logged_after_resuming(
    tmp_path):
  clock = _clock()
  # Killed before its first checkpoint: its steps are all logged again.
  early = events.EventFileWriter(tmp_path, clock=clock)
  early.write_hparams({"method": "simo"})
  early.write_scalars(10, {"loss": -1.0})
  clock.now += 100
  killed = events.EventFileWriter(tmp_path, clock=clock)  # not closed
  killed.write_hparams({"method": "simo"})
  for step in range(10, 60, 10):
    killed.write_scalars(step, {"loss": float(step)})
  clock.now += 100
  resumed = events.EventFileWriter(tmp_path, resumed_from=30, clock=clock)
  for step in (40, 50, 60):
    resumed.write_scalars(step, {"loss": step + 0.5})
  resumed.close()
  expected = [(10, 10.0), (20, 20.0), (30, 30.0), (40, 40.5), (50, 50.5),
              (60, 60.5)]
  assert tensorboard_loaders.python_loader_scalars(tmp_path, "loss") == (
      expected)
  assert tensorboard_loaders.python_loader_hparams(tmp_path) == 1
  assert [(e.step, e.value) for e in _loaded(tmp_path).Scalars("loss")] == (
      expected)


def test_on_object_storage_an_upload_is_the_last_one_grown(tmp_path,
                                                           emulator):
  clock = _clock()
  writer = events.EventFileWriter(f"gs://{gcs_emulator.BUCKET}/run",
                                  clock=clock)
  writer.write_scalars(10, {"loss": 1.0})
  assert gcs_emulator.objects(emulator, "run/") == []  # not yet
  clock.now += 120
  writer.write_scalars(20, {"loss": 2.0})  # 2 minutes on: uploaded
  (name,) = gcs_emulator.objects(emulator, "run/")
  first = gcs_emulator.read_object(emulator, name)
  writer.write_scalars(30, {"loss": 3.0})
  assert gcs_emulator.read_object(emulator, name) == first
  writer.flush()  # as at a checkpoint
  second = gcs_emulator.read_object(emulator, name)
  # TensorBoard reads on from where it stopped, by byte ranges.
  assert second.startswith(first) and len(second) > len(first)
  (tmp_path / name.split("/")[-1]).write_bytes(second)
  assert [e.step for e in _loaded(tmp_path).Scalars("loss")] == [10, 20, 30]


def test_a_live_tensorboard_shows_the_points_written_after_it_started(
    tmp_path):
  logdir = tmp_path / "run"
  writer = events.EventFileWriter(logdir, max_bytes=200)  # 2-3 points
  writer.write_scalars(10, {"loss": 1.0})
  with tensorboard_loaders.serving(logdir, tmp_path / "tb.log") as scalars:
    assert tensorboard_loaders.wait_for(scalars, "loss", [(10, 1.0)]) == [
        (10, 1.0)]
    writer.write_scalars(20, {"loss": 2.0})  # appended
    writer.flush()
    expected = [(10, 1.0), (20, 2.0)]
    assert tensorboard_loaders.wait_for(scalars, "loss", expected) == expected
    for step in range(30, 70, 10):  # and on into new files
      writer.write_scalars(step, {"loss": step / 10})
    writer.flush()
    assert len(list(logdir.iterdir())) >= 2
    expected = [(s, s / 10) for s in range(10, 70, 10)]
    assert tensorboard_loaders.wait_for(scalars, "loss", expected) == expected
    # Killed there, resumed from a checkpoint of step 40, in a process that
    # starts later: its own steps 50 and 60 replace the killed run's.
    resumed = events.EventFileWriter(logdir, resumed_from=40,
                                     clock=lambda: time.time() + 10)
    resumed.write_scalars(50, {"loss": -5.0})
    resumed.write_scalars(60, {"loss": -6.0})
    expected = expected[:4] + [(50, -5.0), (60, -6.0)]
    assert tensorboard_loaders.wait_for(scalars, "loss", expected) == expected
