"""eqco_jax.program.tensorboard_writer: the events a run writes, read back by
TensorBoard's own loader."""

import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from eqco_jax.program import tensorboard_writer


def test_scalars_and_hyperparameters_read_back_across_segments(tmp_path):
  writer = tensorboard_writer.EventFileWriter(str(tmp_path),
                                              flush_every_secs=1e9)
  writer.write_hparams({"method": "simo", "batch_size": 256, "eqco": True})
  writer.write_scalars(10, {"loss": 7.5, "top1": 0.25})
  writer.flush()  # a first segment file
  writer.write_scalars(20, {"loss": 7.0, "top1": 0.5})
  writer.close()  # a second one
  files = sorted(p.name for p in tmp_path.iterdir())
  assert len(files) == 2 and all(
      name.startswith("events.out.tfevents.") for name in files)
  loader = event_accumulator.EventAccumulator(str(tmp_path))
  loader.Reload()
  assert [(e.step, e.value) for e in loader.Scalars("loss")] == [
      (10, 7.5), (20, 7.0)]
  assert [e.value for e in loader.Scalars("top1")] == [0.25, 0.5]
  (content,) = loader.PluginTagToContent("hparams").values()
  hparams = plugin_data_pb2.HParamsPluginData.FromString(
      content).session_start_info.hparams
  assert (hparams["method"].string_value, hparams["batch_size"].number_value,
          hparams["eqco"].bool_value) == ("simo", 256, True)
  with pytest.raises(NotImplementedError, match="scalars and hyperparameters"):
    writer.write_images(1, {})
