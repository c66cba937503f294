"""Backbones leave (torchvision, detectron2) and enter (config.init_from)
eqco-jax, checked against torchvision's own ResNets."""

import importlib.util
import json
import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy
from safetensors import safe_open

import torch_models
from helpers import ROOT, environment, load_state, run
from eqco_jax import builders
from eqco_jax import checkpointing
from eqco_jax import config as config_lib
from eqco_jax import export
from eqco_jax import linear_eval
from eqco_jax import models
from eqco_jax import pretrained
from eqco_jax import sharding
from eqco_jax.errors import UserError
from eqco_jax.models import torchvision_layout

# Its tests share program runs made by fixtures: one worker runs them all
# (setup.cfg).
pytestmark = pytest.mark.xdist_group("export_run")

torch = pytest.importorskip("torch")


def model_config(model: str, **overrides):
  """The default config with ``model`` and the fields a backbone reads."""
  c = config_lib.default_config()
  c.model = model
  c.update(overrides)
  return c


def load_config_file(name: str, variant: str):
  """``configs/<name>``'s ``get_config(variant)``, as --config=FILE:VARIANT."""
  spec = importlib.util.spec_from_file_location(
      name[:-3], os.path.join(ROOT, "configs", name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def jax_features(config, variables, images: np.ndarray) -> np.ndarray:
  backbone = builders.create_backbone(config)
  return np.asarray(jax.jit(
      lambda v, x: backbone.apply(v, x, train=False))(variables, images))


def assert_relative(actual, expected, tolerance=1e-4):
  """Every entry within ``tolerance`` of the largest magnitude."""
  scale = np.abs(expected).max()
  assert scale > 0
  np.testing.assert_allclose(actual, expected, rtol=tolerance,
                             atol=tolerance * scale)


def moco_detectron2_keys(state: dict) -> set:
  """What MoCo's convert-pretrain-to-detectron2.py names the encoder_q keys
  of a checkpoint, written here from its documented behaviour."""
  names = set()
  for key in state:
    if not key.startswith("module.encoder_q."):
      continue
    k = key.replace("module.encoder_q.", "")
    if "layer" not in k:
      k = "stem." + k
    for t in (1, 2, 3, 4):
      k = k.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
      k = k.replace(f"bn{t}", f"conv{t}.norm")
    k = k.replace("downsample.0", "shortcut")
    k = k.replace("downsample.1", "shortcut.norm")
    names.add(k)
  return names


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

  config = model_config(name)
  assert pretrained.file_architecture(path) == dict(
      model=name, width=64, small_image_stem=False)
  variables = pretrained.load_backbone(
      path, pretrained.backbone_shapes(config), name)
  assert_relative(jax_features(config, variables, images), reference)

  # Statistics that came from PyTorch are written back as they are.
  state = torchvision_layout.to_torchvision(variables, num_batches_tracked=7)
  out = str(tmp_path / "export.safetensors")
  export.write_torchvision(state, {"step": "7"}, out)
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
  assert_relative(torch_models.features(fresh, images), reference)


def test_a_pth_export_is_a_plain_dict_of_tensors(tmp_path):
  state = torch_models.state_arrays(torch_models.random_resnet("resnet18"))
  out = str(tmp_path / "r18.pth")
  export.write_torchvision(state, {}, out)
  loaded = torch.load(out, weights_only=True)
  assert type(loaded) is dict and list(loaded) == list(state)
  for key, value in state.items():
    np.testing.assert_array_equal(loaded[key].numpy(), value, err_msg=key)
    assert tuple(loaded[key].shape) == value.shape, key


def test_small_image_stem_is_torchvisions_resnet_with_a_3x3_stem(tmp_path):
  model = torch_models.random_resnet("resnet18", seed=2, small_image=True)
  state = torch_models.state_arrays(model)
  images = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(
      np.float32)
  arch = torchvision_layout.architecture(state)
  assert arch == dict(model="resnet18", width=64, small_image_stem=True)
  config = model_config(**arch)
  variables = torchvision_layout.from_torchvision(state)
  assert_relative(jax_features(config, variables, images),
                  torch_models.features(model, images))


def test_exported_variance_is_what_pytorch_training_keeps():
  """One training batch with BN momentum 1 in both frameworks: flax's biased
  batch variance, converted with the run's counts, is PyTorch's unbiased."""
  config = model_config("resnet10", batch_size=2, image_size=32)
  stages, block = models.resnet.LAYOUTS["resnet10"]
  backbone = models.ResNet(stage_sizes=stages, block_cls=block,
                           bn_momentum=0.0, zero_init_residual=False)
  images = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(
      np.float32)
  variables = backbone.init(jax.random.key(0), images, train=False)
  _, updated = jax.jit(lambda v, x: backbone.apply(
      v, x, train=True, mutable=["batch_stats"]))(variables, images)
  counts = export.variance_counts(config)
  exported = torchvision_layout.to_torchvision(
      {"params": variables["params"], "batch_stats": updated["batch_stats"]},
      variance_counts=counts)

  torchvision = torch_models.import_torchvision()
  model = torchvision.models.resnet.ResNet(
      torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
  model.load_state_dict({k: torch.from_numpy(v) for k, v in
                         torchvision_layout.to_torchvision(variables).items()},
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
      assert_relative(exported[key], trained[key], 1e-3)
  unconverted = np.asarray(updated["batch_stats"]["layer4_0"]["bn2"]["var"])
  assert_relative(trained["layer4.0.bn2.running_var"], 2 * unconverted, 1e-3)


def test_variance_counts_are_bn_group_times_each_layers_pixels():
  config = model_config("resnet50", batch_size=256, image_size=224)
  counts = export.variance_counts(config)
  assert counts["bn1"] == 256 * 112 * 112
  assert counts["layer1.0.bn1"] == counts["layer2.0.bn1"] == 256 * 56 * 56
  assert counts["layer2.0.bn2"] == counts["layer2.0.downsample.1"] == (
      256 * 28 * 28)
  assert counts["layer4.2.bn3"] == 256 * 7 * 7
  assert len(counts) == 53
  config.bn_group_size = 32
  assert export.variance_counts(config)["layer4.2.bn3"] == 32 * 7 * 7


def test_detectron2_names_are_mocos_converter_names():
  state = torch_models.state_arrays(torch_models.random_resnet("resnet50"))
  ours = torchvision_layout.to_detectron2(state)
  moco = moco_detectron2_keys({f"module.encoder_q.{k}": v
                               for k, v in state.items()})
  assert set(ours) == moco
  assert len(ours) == len(state)
  np.testing.assert_array_equal(ours["res5.2.conv3.norm.running_var"],
                                state["layer4.2.bn3.running_var"])
  np.testing.assert_array_equal(ours["res3.0.shortcut.weight"],
                                state["layer2.0.downsample.0.weight"])


# --------------------------------------------- files in, and mistakes.


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
  config = model_config(model, width=width)
  with pytest.raises(UserError) as error:
    pretrained.load_backbone(path, pretrained.backbone_shapes(config), model)
  assert str(error.value).startswith(f"config.init_from={path} {message}; ")


def test_init_from_must_be_a_file(tmp_path):
  config = config_lib.default_config()
  config.init_from = str(tmp_path / "none.pth")
  with pytest.raises(UserError, match=r"config.init_from='.*none.pth' is not "
                     "allowed: use '' or the path of a torchvision ResNet"):
    config_lib.validate(config, 1)


def test_nothing_but_torchvision_widths_and_stems_are_exported():
  config = config_lib.default_config()
  config.width = 16
  with pytest.raises(UserError, match=r"width=16 cannot be expressed"):
    export.check_exportable(config, "torchvision", "x.safetensors")
  config.width, config.small_image_stem = 64, True
  export.check_exportable(config, "torchvision", "x.safetensors")
  with pytest.raises(UserError, match="small_image_stem=True cannot be "):
    export.check_exportable(config, "detectron2", "x.pkl")
  config.small_image_stem, config.model = False, "resnet10"
  with pytest.raises(UserError, match="detectron2 has no resnet10"):
    export.check_exportable(config, "detectron2", "x.pkl")


def test_init_from_sets_online_and_momentum_backbones(tmp_path):
  model = torch_models.random_resnet("resnet18", seed=4)
  path = str(tmp_path / "supervised.pth")
  torch.save(model.state_dict(), path)
  config = model_config("resnet18", image_size=32, head_hidden_dim=32,
                        head_out_dim=16, init_from=path)
  mesh = sharding.make_mesh()
  encoder = builders.create_encoder(config)
  tx, _ = builders.create_optimizer(config, 10)
  # The initial state's structure, filled with 3s (compiles nothing).
  shapes = jax.eval_shape(
      lambda: builders.initial_state(config, encoder, tx, mesh))
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


def test_linear_eval_backbone_from_a_file_is_torchvisions(tmp_path):
  model = torch_models.random_resnet("resnet18", seed=6)
  path = str(tmp_path / "r18.safetensors")
  safetensors_numpy.save_file(torch_models.state_arrays(model), path)
  config = load_config_file("linear_eval.py", "features")
  config.init_from = path
  pretrain = linear_eval.imported_model_config(config)
  assert (pretrain.model, pretrain.width, pretrain.small_image_stem) == (
      "resnet18", 64, False)
  assert (pretrain.dataset, pretrain.image_size) == ("imagenet2012", 224)
  mesh = sharding.make_mesh()
  variables = linear_eval.restore_imported(path, pretrain, mesh)
  assert variables["params"]["conv1"]["kernel"].sharding == (
      sharding.replicated(mesh))
  images = np.random.default_rng(3).normal(size=(8, 32, 32, 3)).astype(
      np.float32)
  assert_relative(jax_features(pretrain, variables, images),
                  torch_models.features(model, images))
  config.pretrain_workdir = str(tmp_path)
  with pytest.raises(UserError, match="pretrain_workdir and config.init_from "
                     "are both set"):
    linear_eval.imported_model_config(config)


@pytest.mark.parametrize("name, blocks", [("resnet34", "layer3.5.conv2"),
                                          ("resnet101", "layer3.22.conv3")])
def test_deeper_torchvision_resnets_are_recognised(name, blocks):
  state = torch_models.state_arrays(
      getattr(torch_models.import_torchvision().models, name)())
  assert f"{blocks}.weight" in state
  assert torchvision_layout.architecture(state) == dict(
      model=name, width=64, small_image_stem=False)
  shapes = torchvision_layout.torchvision_shapes(
      pretrained.backbone_shapes(model_config(name, image_size=32)))
  assert shapes == {k: v.shape for k, v in state.items()}


# ------------------------------------------- the commands, as a user runs them.

# A 2-step quick-start run of a ResNet-18 with torchvision's stem and width,
# at a learning rate that leaves the weights where init_from put them.
TINY_RESNET18 = (
    "--config.model=resnet18", "--config.width=64",
    "--config.small_image_stem=False", "--config.num_train_steps=2",
    "--config.batch_size=8", "--config.final_eval=False",
    "--config.base_learning_rate=1e-9", "--config.checkpoint_every_steps=2",
    "--config.log_every_steps=1")


def export_command(workdir, *flags) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "eqco_jax.export", f"--workdir={workdir}",
       *flags], cwd=ROOT, env=environment(1), capture_output=True, text=True,
      timeout=300)


def torchvision_resnet18_state() -> dict:
  """``torchvision.models.resnet18().state_dict()`` less fc, as numpy."""
  return torch_models.state_arrays(
      torch_models.import_torchvision().models.resnet18())


@pytest.fixture(scope="module")
def imported_run(tmp_path_factory):
  """``(workdir, initial torchvision state)`` of TINY_RESNET18 started from
  a MoCo-style checkpoint of a fresh torchvision ResNet-18."""
  tmp = tmp_path_factory.mktemp("imported")
  torch.manual_seed(5)
  model = torch_models.import_torchvision().models.resnet18()
  checkpoint = str(tmp / "checkpoint_0199.pth.tar")
  torch.save({"state_dict": {f"module.encoder_q.{k}": v
                             for k, v in model.state_dict().items()}},
             checkpoint)
  workdir = tmp / "run"
  run(workdir, *TINY_RESNET18, f"--config.init_from={checkpoint}")
  return workdir, torch_models.state_arrays(model), checkpoint


def assert_weights_close(exported: dict, initial: dict, prefix: str = ""):
  """Conv and BN weights and biases as the run started (lr about 0)."""
  for key, value in initial.items():
    if key.endswith((".weight", ".bias")):
      np.testing.assert_allclose(exported[prefix + key], value, rtol=1e-5,
                                 atol=1e-7, err_msg=key)


def test_export_command_writes_torchvisions_resnet18(imported_run, tmp_path):
  workdir, initial, _ = imported_run
  out = tmp_path / "r18.safetensors"
  result = export_command(workdir, f"--out={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert (f"Wrote the online backbone of {workdir} at step 2 (resnet18) to "
          f"{out}.") in result.stdout
  exported = safetensors_numpy.load_file(str(out))
  reference = torchvision_resnet18_state()
  assert sorted(exported) == sorted(reference)  # safetensors sorts its keys
  for key, value in reference.items():
    assert (exported[key].shape, exported[key].dtype) == (
        value.shape, value.dtype), key
  model = torch_models.import_torchvision().models.resnet18()
  result = model.load_state_dict(
      {k: torch.from_numpy(v) for k, v in exported.items()}, strict=False)
  assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
  assert result.unexpected_keys == []

  with safe_open(str(out), "np") as f:
    info = f.metadata()
  run_config = export.read_run_config(str(workdir))
  assert (info["method"], info["step"], info["encoder"], info["model"]) == (
      "simo", "2", "online", "resnet18")
  assert json.loads(info["identity"]) == checkpointing.identity(run_config)
  assert "n = 8 examples per BN group x H x W of each layer at 32x32" in (
      info["bn_running_var"])
  # Both encoders started from the checkpoint (encoder_q., without fc).
  assert_weights_close(exported, initial)
  # Flax's biased variance x n / (n - 1): n = 8 x 1 x 1 in layer4 at 32 px.
  stats = load_state(workdir, 2)["batch_stats"]["backbone"]
  np.testing.assert_allclose(exported["layer4.1.bn2.running_var"],
                             np.asarray(stats["layer4_1"]["bn2"]["var"]) * 8
                             / 7, rtol=1e-6)
  np.testing.assert_allclose(exported["bn1.running_var"],
                             np.asarray(stats["bn1"]["var"]) * 2048 / 2047,
                             rtol=1e-6)
  assert int(exported["bn1.num_batches_tracked"]) == 2


def test_export_writes_detectron2s_pickle(imported_run, tmp_path):
  workdir, initial, _ = imported_run
  out = str(tmp_path / "r18.pkl")
  info = export.export(str(workdir), out, encoder="momentum",
                       fmt="detectron2")
  assert (info["encoder"], info["step"]) == ("momentum", "2")
  with open(out, "rb") as f:
    written = pickle.load(f)
  assert set(written) == {"model", "__author__", "matching_heuristics"}
  assert written["matching_heuristics"] is True
  moco = moco_detectron2_keys({f"module.encoder_q.{k}": v for k, v in
                               torchvision_resnet18_state().items()})
  assert set(written["model"]) == moco
  assert all(isinstance(v, np.ndarray) for v in written["model"].values())
  as_torchvision = {k: written["model"][torchvision_layout.detectron2_name(k)]
                    for k in initial}
  assert_weights_close(as_torchvision, initial)
  with pytest.raises(UserError, match=r"has no checkpoint of step 5; its "
                     r"checkpoints are of steps \[2\]\."):
    export.export(str(workdir), out, step=5, fmt="detectron2")
  lines = export.detectron2_config(export.read_run_config(str(workdir)), out)
  for line in (f'WEIGHTS: "{out}"', "PIXEL_MEAN: [127.500, 127.500, 127.500]",
               "PIXEL_STD: [127.500, 127.500, 127.500]", "DEPTH: 18",
               "STRIDE_IN_1X1: False", "RES2_OUT_CHANNELS: 64",
               'FORMAT: "RGB"'):
    assert line in lines.splitlines() or f"  {line}" in lines, line


def test_export_command_refuses_a_width_torchvision_lacks(tmp_path):
  workdir = tmp_path / "quickstart"
  workdir.mkdir()
  (workdir / "config.json").write_text(
      load_config_file("quickstart.py", "tiny").to_json_best_effort())
  result = export_command(workdir, f"--out={tmp_path}/x.safetensors")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "error: the run's width=4 cannot be expressed in torchvision's or "
      "detectron2's ResNets, whose first stage is 64 channels wide; export a "
      "run made with width=64.")
  assert not (tmp_path / "x.safetensors").exists()


def test_linear_eval_of_an_official_style_checkpoint(imported_run, tmp_path,
                                                    fake_tfds_dir):
  _, _, checkpoint = imported_run
  config = load_config_file("linear_eval.py", "features")
  config.update(dict(init_from=checkpoint, dataset="cifar10",
                     data_dir=fake_tfds_dir, image_size=16, epochs=1,
                     eval_batch_size=32))
  results = linear_eval.run(config, str(tmp_path / "linear"))
  report = json.loads((tmp_path / "linear" / "linear_eval.json").read_text())
  assert report == dict(results, decay_epochs=[60, 80])
  assert (report["init_from"], report["model"]) == (checkpoint, "resnet18")
  assert (report["pretrain_workdir"], report["pretrain_step"]) == (None, None)
  assert 0.0 <= report["top1"] <= report["top5"] <= 1.0


def test_linear_eval_of_the_run_itself_reads_its_checkpoint(
    imported_run, tmp_path, fake_tfds_dir):
  workdir, _, _ = imported_run
  config = load_config_file("linear_eval.py", "features")
  config.update(dict(pretrain_workdir=str(workdir), dataset="cifar10",
                     data_dir=fake_tfds_dir, image_size=16, epochs=1,
                     eval_batch_size=32))
  report = linear_eval.run(config, str(tmp_path / "linear"))
  assert (report["pretrain_workdir"], report["pretrain_step"]) == (
      str(workdir), 2)
  assert "init_from" not in report
  assert 0.0 <= report["top1"] <= report["top5"] <= 1.0
