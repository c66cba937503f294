"""eqco_jax.program.torchvision.writing: a backbone written for torchvision
and detectron2, checked against torchvision's own ResNets and PyTorch's BN
statistics."""

import jax
import numpy as np
import pytest
import torch
from safetensors import numpy as safetensors_numpy

import torch_models
from helpers import default_config
from eqco_jax.core import config as config_lib
from eqco_jax.core import models
from eqco_jax.core.errors import UserError
from eqco_jax.core.training import builders
from eqco_jax.program.torchvision import layout
from eqco_jax.program.torchvision import reading
from eqco_jax.program.torchvision import writing

# ------------------------------------------ exactness against torchvision.


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_resnet_round_trip_gives_torchvisions_features(
    tmp_path, name):
  model = torch_models.random_resnet(name, seed=1)
  original = torch_models.state_arrays(model)
  images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(
      np.float32)
  reference = torch_models.features(model, images)
  path = str(tmp_path / "torchvision.pth")
  torch.save(model.state_dict(), path)  # with fc, as torchvision saves it

  config = default_config(model=name)
  assert reading.file_architecture(path) == dict(
      model=name, width=64, small_image_stem=False)
  variables = reading.load_backbone(
      path, reading.backbone_shapes(builders.backbone_of(config), 224), name)
  torch_models.assert_relative(
      torch_models.jax_features(config, variables, images), reference)

  # Statistics that came from PyTorch are written back as they are.
  state = layout.to_torchvision(variables, num_batches_tracked=7)
  out = str(tmp_path / "export.safetensors")
  writing.write_torchvision(state, {"step": "7"}, out)
  written = safetensors_numpy.load_file(out)
  assert {k: (v.shape, v.dtype) for k, v in written.items()} == {
      k: (v.shape, v.dtype) for k, v in original.items()}
  fresh = getattr(torch_models.import_torchvision().models, name)().eval()
  result = fresh.load_state_dict(
      {k: torch.from_numpy(v) for k, v in written.items()}, strict=False)
  assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
  assert result.unexpected_keys == []
  reloaded = torch_models.state_arrays(fresh)
  assert list(reloaded) == list(original)
  for key, value in original.items():
    assert reloaded[key].dtype == value.dtype, key
    np.testing.assert_array_equal(reloaded[key], value, err_msg=key)
  torch_models.assert_relative(torch_models.features(fresh, images),
                               reference)


def test_a_pth_export_is_a_plain_dict_of_tensors(tmp_path):
  state = torch_models.state_arrays(torch_models.random_resnet("resnet18"))
  out = str(tmp_path / "r18.pth")
  writing.write_torchvision(state, {}, out)
  loaded = torch.load(out, weights_only=True)
  assert type(loaded) is dict and list(loaded) == list(state)
  for key, value in state.items():
    np.testing.assert_array_equal(loaded[key].numpy(), value, err_msg=key)
    assert tuple(loaded[key].shape) == value.shape, key


def test_exported_variance_is_what_pytorch_training_keeps():
  """One training batch with BN momentum 1 in both frameworks: flax's biased
  batch variance, converted with the run's counts, is PyTorch's unbiased."""
  config = default_config(model="resnet10", batch_size=2, image_size=32)
  stages, block = models.LAYOUTS["resnet10"]
  backbone = models.ResNet(stage_sizes=stages, block_cls=block,
                           bn_momentum=0.0, zero_init_residual=False)
  images = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(
      np.float32)
  variables = backbone.init(jax.random.key(0), images, train=False)
  _, updated = jax.jit(lambda v, x: backbone.apply(
      v, x, train=True, mutable=["batch_stats"]))(variables, images)
  counts = writing.variance_counts(config)
  exported = layout.to_torchvision(
      {"params": variables["params"], "batch_stats": updated["batch_stats"]},
      variance_counts=counts)

  torchvision = torch_models.import_torchvision()
  model = torchvision.models.resnet.ResNet(
      torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
  model.load_state_dict({k: torch.from_numpy(v) for k, v in
                         layout.to_torchvision(variables).items()},
                        strict=False)
  for module in model.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      module.momentum = 1.0  # running statistics = this batch's
  model.train()
  with torch.no_grad():
    model(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  trained = torch_models.state_arrays(model)
  # layer4 is 1x1 at 32 px: n = 2 values a channel, the variance doubles.
  assert counts["layer4.0.bn2"] == 2 and counts["bn1"] == 2 * 16 * 16
  for key in trained:
    if key.endswith(("running_mean", "running_var")):
      torch_models.assert_relative(exported[key], trained[key], 1e-3)
  unconverted = np.asarray(updated["batch_stats"]["layer4_0"]["bn2"]["var"])
  torch_models.assert_relative(trained["layer4.0.bn2.running_var"],
                               2 * unconverted, 1e-3)


def test_variance_counts_are_bn_group_times_each_layers_pixels():
  config = default_config(model="resnet50", batch_size=256, image_size=224)
  counts = writing.variance_counts(config)
  assert counts["bn1"] == 256 * 112 * 112
  assert counts["layer1.0.bn1"] == counts["layer2.0.bn1"] == 256 * 56 * 56
  assert counts["layer2.0.bn2"] == counts["layer2.0.downsample.1"] == (
      256 * 28 * 28)
  assert counts["layer4.2.bn3"] == 256 * 7 * 7
  assert len(counts) == 53
  config.bn_group_size = 32
  assert writing.variance_counts(config)["layer4.2.bn3"] == 32 * 7 * 7


def test_nothing_but_torchvision_widths_and_stems_are_exported():
  config = config_lib.default_config()
  config.width = 16
  with pytest.raises(UserError, match=r"width=16 cannot be expressed"):
    writing.check_exportable(config, "torchvision", "x.safetensors")
  config.width, config.small_image_stem = 64, True
  writing.check_exportable(config, "torchvision", "x.safetensors")
  with pytest.raises(UserError, match="small_image_stem=True cannot be "):
    writing.check_exportable(config, "detectron2", "x.pkl")
  config.small_image_stem, config.model = False, "resnet10"
  with pytest.raises(UserError, match="detectron2 has no resnet10"):
    writing.check_exportable(config, "detectron2", "x.pkl")
