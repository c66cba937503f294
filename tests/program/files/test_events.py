"""eqco_jax.program.files.events: the events a run writes, read back by
TensorBoard's own loader (a restarted run's: scenarios/test_pretraining.py)."""

import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from eqco_jax.program.files import events


def test_one_file_rewritten_whole_until_full_then_the_next(tmp_path):
  writer = events.EventFileWriter(
      str(tmp_path), flush_every_secs=1e9, max_bytes=1000)
  writer.write_hparams({"method": "simo", "batch_size": 256, "eqco": True})
  writer.write_scalars(10, {"loss": 7.5, "top1": 0.25})
  writer.flush()
  (first,) = list(tmp_path.iterdir())
  written = first.stat().st_size
  writer.write_scalars(20, {"loss": 7.0, "top1": 0.5})
  writer.flush()  # the same file, whole again
  assert list(tmp_path.iterdir()) == [first]
  assert first.stat().st_size > written
  for step in range(30, 200, 10):  # past 1000 bytes: a second file
    writer.write_scalars(step, {"loss": 7.0 - step / 100, "top1": 0.5})
  writer.close()
  files = sorted(p.name for p in tmp_path.iterdir())
  assert files == [first.name, first.name + ".1"]
  assert all(p.stat().st_size <= 1000 for p in tmp_path.iterdir())

  loader = event_accumulator.EventAccumulator(str(tmp_path))
  loader.Reload()
  assert [e.step for e in loader.Scalars("loss")] == list(range(10, 200, 10))
  assert [e.value for e in loader.Scalars("loss")][:2] == [7.5, 7.0]
  (content,) = loader.PluginTagToContent("hparams").values()
  hparams = plugin_data_pb2.HParamsPluginData.FromString(
      content).session_start_info.hparams
  assert (hparams["method"].string_value, hparams["batch_size"].number_value,
          hparams["eqco"].bool_value) == ("simo", 256, True)
  with pytest.raises(NotImplementedError, match="scalars and hyperparameters"):
    writer.write_images(1, {})
