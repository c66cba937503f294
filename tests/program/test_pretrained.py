"""eqco_jax.program.pretrained: torchvision files in (``config.init_from``),
checked against torchvision's own ResNets."""

import jax
import numpy as np
import pytest
import torch
from safetensors import numpy as safetensors_numpy

import torch_models
from helpers import default_config
from eqco_jax.core import builders
from eqco_jax.core import config as config_lib
from eqco_jax.core import sharding
from eqco_jax.core.errors import UserError
from eqco_jax.core.models import torchvision_layout
from eqco_jax.program import pretrained


def test_official_checkpoint_wrappers_are_stripped_and_heads_ignored(tmp_path):
  model = torch_models.random_resnet("resnet18", seed=3)
  state = model.state_dict()
  moco = {"epoch": 200, "arch": "resnet18", "state_dict": {
      **{f"module.encoder_q.{k}": v for k, v in state.items()
         if not k.startswith("fc.")},
      "module.encoder_q.fc.0.weight": torch.zeros(2048, 512),
      "module.encoder_q.fc.2.weight": torch.zeros(128, 2048),
      **{f"module.encoder_k.{k}": v + 1 for k, v in state.items()},
      "module.queue": torch.zeros(128, 16)}}
  path = str(tmp_path / "checkpoint_0199.pth.tar")
  torch.save(moco, path)
  read = pretrained.read_backbone_state(path)
  expected = torch_models.state_arrays(model)
  assert list(read) == list(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(read[key], value, err_msg=key)


@pytest.mark.parametrize("model, width, message", [
    ("resnet50", 64, "has 'layer1.0.conv1.weight' of shape (64, 64, 3, 3) "
     "where the config's resnet50 needs (64, 64, 1, 1)"),
    ("resnet18", 16, "has 'conv1.weight' of shape (64, 3, 7, 7) where the "
     "config's resnet18 needs (16, 3, 7, 7)"),
    ("resnet10", 64, "has 'layer1.1.conv1.weight', which the config's "
     "resnet10 does not have"),
])
def test_init_from_another_architecture_names_the_key(tmp_path, model, width,
                                                      message):
  path = str(tmp_path / "r18.safetensors")
  state = torch_models.state_arrays(torch_models.random_resnet("resnet18"))
  safetensors_numpy.save_file(state, path)
  config = default_config(model=model, width=width)
  with pytest.raises(UserError) as error:
    pretrained.load_backbone(path, pretrained.backbone_shapes(config), model)
  assert str(error.value).startswith(f"config.init_from={path} {message}; ")


def test_init_from_must_be_a_file(tmp_path):
  config = config_lib.default_config()
  config.init_from = str(tmp_path / "none.pth")
  with pytest.raises(UserError, match=r"config.init_from='.*none.pth' is not "
                     "allowed: use '' or the path of a torchvision ResNet"):
    config_lib.validate(config, 1)


def test_init_from_sets_online_and_momentum_backbones(tmp_path):
  model = torch_models.random_resnet("resnet18", seed=4)
  path = str(tmp_path / "supervised.pth")
  torch.save(model.state_dict(), path)
  config = default_config(model="resnet18", image_size=32, head_hidden_dim=32,
                          head_out_dim=16, init_from=path)
  mesh = sharding.make_mesh()
  run = builders.build_pretraining(config, total_steps=10)
  # The initial state's structure, filled with 3s (compiles nothing).
  shapes = jax.eval_shape(lambda: run.initial_state(mesh))
  state = jax.tree.map(
      lambda s: jax.device_put(np.full(s.shape, 3, s.dtype),
                               sharding.replicated(mesh)), shapes)
  head = jax.tree.map(np.asarray, state.params["head"])
  state = pretrained.initialise_backbone(state, config)
  wanted = torchvision_layout.from_torchvision(
      torch_models.state_arrays(model))
  for params, stats in ((state.params, state.batch_stats),
                        (state.momentum_params, state.momentum_batch_stats)):
    jax.tree.map(np.testing.assert_array_equal,
                 jax.tree.map(np.asarray, params["backbone"]),
                 wanted["params"])
    jax.tree.map(np.testing.assert_array_equal,
                 jax.tree.map(np.asarray, stats["backbone"]),
                 wanted["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal,
               jax.tree.map(np.asarray, state.params["head"]), head)
  assert state.params["backbone"]["conv1"]["kernel"].sharding == (
      sharding.replicated(mesh))
