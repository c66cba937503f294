"""eqco_jax.core.models.torchvision_layout: a backbone's variables are
torchvision's ResNet state_dict, and detectron2's names are MoCo's."""

import numpy as np
import pytest

import torch_models
from helpers import default_config
from eqco_jax.core.models import torchvision_layout
from eqco_jax.program import pretrained


def test_small_image_stem_is_torchvisions_resnet_with_a_3x3_stem(tmp_path):
  model = torch_models.random_resnet("resnet18", seed=2, small_image=True)
  state = torch_models.state_arrays(model)
  images = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(
      np.float32)
  arch = torchvision_layout.architecture(state)
  assert arch == dict(model="resnet18", width=64, small_image_stem=True)
  config = default_config(**arch)
  variables = torchvision_layout.from_torchvision(state)
  torch_models.assert_relative(
      torch_models.jax_features(config, variables, images),
      torch_models.features(model, images))


def test_detectron2_names_are_mocos_converter_names():
  state = torch_models.state_arrays(torch_models.random_resnet("resnet50"))
  ours = torchvision_layout.to_detectron2(state)
  moco = torch_models.moco_detectron2_keys({f"module.encoder_q.{k}": v
                               for k, v in state.items()})
  assert set(ours) == moco
  assert len(ours) == len(state)
  np.testing.assert_array_equal(ours["res5.2.conv3.norm.running_var"],
                                state["layer4.2.bn3.running_var"])
  np.testing.assert_array_equal(ours["res3.0.shortcut.weight"],
                                state["layer2.0.downsample.0.weight"])


@pytest.mark.parametrize("name, blocks", [("resnet34", "layer3.5.conv2"),
                                          ("resnet101", "layer3.22.conv3")])
def test_deeper_torchvision_resnets_are_recognised(name, blocks):
  state = torch_models.state_arrays(
      getattr(torch_models.import_torchvision().models, name)())
  assert f"{blocks}.weight" in state
  assert torchvision_layout.architecture(state) == dict(
      model=name, width=64, small_image_stem=False)
  shapes = torchvision_layout.torchvision_shapes(
      pretrained.backbone_shapes(default_config(model=name, image_size=32)))
  assert shapes == {k: v.shape for k, v in state.items()}
