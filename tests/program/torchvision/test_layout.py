"""eqco_jax.program.torchvision.layout: a backbone's variables are
torchvision's ResNet state_dict, detectron2's names are MoCo's, and other
frameworks' checkpoints are found or refused in one sentence (the files
themselves: tests/program/torchvision/test_reading.py)."""

import numpy as np
import pytest

import torch_models
from helpers import default_config
from eqco_jax.core.errors import UserError
from eqco_jax.core.training import builders
from eqco_jax.program.torchvision import layout
from eqco_jax.program.torchvision import reading


def test_small_image_stem_is_torchvisions_resnet_with_a_3x3_stem(tmp_path):
  model = torch_models.random_resnet("resnet18", seed=2, small_image=True)
  state = torch_models.state_arrays(model)
  images = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(
      np.float32)
  arch = layout.architecture(state)
  assert arch == dict(model="resnet18", width=64, small_image_stem=True)
  config = default_config(**arch)
  variables = layout.from_torchvision(state)
  torch_models.assert_relative(
      torch_models.jax_features(config, variables, images),
      torch_models.features(model, images))


def test_detectron2_names_are_mocos_converter_names():
  state = torch_models.state_arrays(torch_models.random_resnet("resnet50"))
  ours = layout.to_detectron2(state)
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
  assert layout.architecture(state) == dict(
      model=name, width=64, small_image_stem=False)
  shapes = layout.torchvision_shapes(
      reading.backbone_shapes(builders.backbone_of(default_config(model=name)), 32))
  assert shapes == {k: v.shape for k, v in state.items()}


def _tiny_state() -> dict:
  return {"conv1.weight": np.zeros((4, 3, 3, 3), np.float32),
          "bn1.weight": np.ones(4, np.float32),
          "layer1.0.conv1.weight": np.zeros((4, 4, 3, 3), np.float32)}


def test_an_unknown_layout_names_its_first_keys_and_the_known_layouts():
  checkpoint = {"state_dict": {f"online_encoder.net.{k}": v
                               for k, v in _tiny_state().items()}}
  with pytest.raises(UserError) as error:
    layout.backbone_state(checkpoint)
  assert str(error.value) == (
      "the checkpoint holds no ResNet keys in a layout eqco-jax reads (its "
      "first keys are state_dict/online_encoder.net.conv1.weight, "
      "state_dict/online_encoder.net.bn1.weight, "
      "state_dict/online_encoder.net.layer1.0.conv1.weight); give a "
      "ResNet's torchvision state_dict, or a checkpoint as torchvision, "
      "timm, MoCo v1/v2, MoCo v3, solo-learn, mmselfsup, VISSL write it.")


def test_two_encoders_behind_two_known_prefixes_are_refused():
  state = _tiny_state()
  checkpoint = {**{f"backbone.{k}": v for k, v in state.items()},
                **{f"encoder.{k}": v + 1 for k, v in state.items()}}
  with pytest.raises(UserError, match="^the checkpoint holds two ResNets, "
                     "under 'backbone.' and 'encoder.'; keep one encoder's "
                     "weights in the file.$"):
    layout.backbone_state(checkpoint)


def test_the_first_container_holding_a_backbone_is_taken():
  state = _tiny_state()
  # A Lightning-style file: the backbone under state_dict, a second copy
  # elsewhere in a container not tried (timm's EMA weights).
  checkpoint = {"epoch": np.asarray(3), "state_dict": {
      **{f"backbone.{k}": v for k, v in state.items()},
      **{f"momentum_backbone.{k}": v + 1 for k, v in state.items()}},
                "state_dict_ema": {k: v + 2 for k, v in state.items()}}
  read = layout.backbone_state(checkpoint)
  assert list(read) == list(state)
  for key, value in state.items():
    np.testing.assert_array_equal(read[key], value)
