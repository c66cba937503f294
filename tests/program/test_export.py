"""eqco_jax.program.export: a run's backbone out to torchvision and
detectron2, checked against torchvision's own ResNets."""

import json
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors import numpy as safetensors_numpy
from safetensors import safe_open

import torch_models
from helpers import ROOT, default_config, environment, load_config
from helpers import load_state
from eqco_jax.core import config as config_lib
from eqco_jax.core import models
from eqco_jax.core.errors import UserError
from eqco_jax.core.models import torchvision_layout
from eqco_jax.program import checkpointing
from eqco_jax.program import export
from eqco_jax.program import pretrained

# Its tests read one program run (conftest.imported_run): one worker runs
# them all (setup.cfg).
pytestmark = pytest.mark.xdist_group("export_run")


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
  assert pretrained.file_architecture(path) == dict(
      model=name, width=64, small_image_stem=False)
  variables = pretrained.load_backbone(
      path, pretrained.backbone_shapes(config), name)
  torch_models.assert_relative(
      torch_models.jax_features(config, variables, images), reference)

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
  torch_models.assert_relative(torch_models.features(fresh, images),
                               reference)


def test_a_pth_export_is_a_plain_dict_of_tensors(tmp_path):
  state = torch_models.state_arrays(torch_models.random_resnet("resnet18"))
  out = str(tmp_path / "r18.pth")
  export.write_torchvision(state, {}, out)
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
      torch_models.assert_relative(exported[key], trained[key], 1e-3)
  unconverted = np.asarray(updated["batch_stats"]["layer4_0"]["bn2"]["var"])
  torch_models.assert_relative(trained["layer4.0.bn2.running_var"],
                               2 * unconverted, 1e-3)


def test_variance_counts_are_bn_group_times_each_layers_pixels():
  config = default_config(model="resnet50", batch_size=256, image_size=224)
  counts = export.variance_counts(config)
  assert counts["bn1"] == 256 * 112 * 112
  assert counts["layer1.0.bn1"] == counts["layer2.0.bn1"] == 256 * 56 * 56
  assert counts["layer2.0.bn2"] == counts["layer2.0.downsample.1"] == (
      256 * 28 * 28)
  assert counts["layer4.2.bn3"] == 256 * 7 * 7
  assert len(counts) == 53
  config.bn_group_size = 32
  assert export.variance_counts(config)["layer4.2.bn3"] == 32 * 7 * 7


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


# ------------------------------------------- the commands, as a user runs them.


def export_command(workdir, *flags) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "eqco_jax.export", f"--workdir={workdir}",
       *flags], cwd=ROOT, env=environment(1), capture_output=True, text=True,
      timeout=300)


def initial_resnet18_state() -> dict:
  """The weights conftest.imported_run started from, less fc, as numpy."""
  return torch_models.state_arrays(
      torch_models.torchvision_resnet18(torch_models.IMPORTED_SEED))


def assert_weights_close(exported: dict, initial: dict, prefix: str = ""):
  """Conv and BN weights and biases as the run started (lr about 0)."""
  for key, value in initial.items():
    if key.endswith((".weight", ".bias")):
      np.testing.assert_allclose(exported[prefix + key], value, rtol=1e-5,
                                 atol=1e-7, err_msg=key)


def test_export_command_writes_torchvisions_resnet18(imported_run, tmp_path):
  workdir, _ = imported_run
  initial = initial_resnet18_state()
  out = tmp_path / "r18.safetensors"
  result = export_command(workdir, f"--out={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert (f"Wrote the online backbone of {workdir} at step 2 (resnet18) to "
          f"{out}.") in result.stdout
  exported = safetensors_numpy.load_file(str(out))
  reference = torch_models.state_arrays(torch_models.torchvision_resnet18())
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
  workdir, _ = imported_run
  initial = initial_resnet18_state()
  out = str(tmp_path / "r18.pkl")
  info = export.export(str(workdir), out, encoder="momentum",
                       fmt="detectron2")
  assert (info["encoder"], info["step"]) == ("momentum", "2")
  with open(out, "rb") as f:
    written = pickle.load(f)
  assert set(written) == {"model", "__author__", "matching_heuristics"}
  assert written["matching_heuristics"] is True
  moco = torch_models.moco_detectron2_keys({f"module.encoder_q.{k}": v for k, v in
                               torch_models.state_arrays(torch_models.torchvision_resnet18()).items()})
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
      load_config("quickstart.py", "tiny").to_json_best_effort())
  result = export_command(workdir, f"--out={tmp_path}/x.safetensors")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "error: the run's width=4 cannot be expressed in torchvision's or "
      "detectron2's ResNets, whose first stage is 64 channels wide; export a "
      "run made with width=64.")
  assert not (tmp_path / "x.safetensors").exists()
