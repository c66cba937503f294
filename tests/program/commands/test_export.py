"""eqco_jax.program.commands.export: the export command on a run, as a user
types it: torchvision's ResNet-18 and detectron2's pickle of its backbone,
and a run torchvision cannot hold refused in one sentence."""

import json
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import numpy as safetensors_numpy
from safetensors import safe_open

import torch_models
from helpers import ROOT, environment, load_config
from helpers import load_state
from eqco_jax.core import run_identity
from eqco_jax.core.errors import UserError
from eqco_jax.program.commands import export
from eqco_jax.program.files.workdir import Workdir
from eqco_jax.program.torchvision import layout
from eqco_jax.program.torchvision import writing

# Its tests read one program run (conftest.imported_run): one worker runs
# them all (setup.cfg).
pytestmark = pytest.mark.xdist_group("export_run")


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
  # At the default verbosity no INFO line (orbax logs about 40 a restore).
  assert not re.findall(r"^I\d{4} ", result.stderr, re.MULTILINE), (
      result.stderr[:3000])
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
  run_config = Workdir(workdir).read_run_config()
  assert (info["method"], info["step"], info["encoder"], info["model"]) == (
      "simo", "2", "online", "resnet18")
  assert json.loads(info["identity"]) == run_identity.identity(run_config)
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
  as_torchvision = {k: written["model"][layout.detectron2_name(k)]
                    for k in initial}
  assert_weights_close(as_torchvision, initial)
  with pytest.raises(UserError, match=r"has no checkpoint of step 5; its "
                     r"checkpoints are of steps \[2\]\."):
    export.export(str(workdir), out, step=5, fmt="detectron2")
  lines = writing.detectron2_config(Workdir(workdir).read_run_config(), out)
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
