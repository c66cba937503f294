"""eqco_jax.program.commands.linear_eval: the protocol on a pretraining run's
backbone or on a torchvision file's (the image-level protocol on ImageNet:
test_documented_commands.py)."""

import datetime
import json
import os
import signal
import time
import types

import jax
import numpy as np
import pytest
from clu import periodic_actions
from orbax.checkpoint import checkpoint_manager as orbax_checkpoint_manager
from safetensors import numpy as safetensors_numpy

import torch_models
from helpers import ROOT, LoggedWarnings, checkpoint_steps, load_config
from helpers import run, run_failing
from eqco_jax.core import sharding
from eqco_jax.core.evaluate import linear_eval_images
from eqco_jax.core.errors import UserError
from eqco_jax.core.training import builders
from eqco_jax.program.commands import linear_eval
from eqco_jax.program.files.workdir import Workdir
from eqco_jax.program.run import pacing


def test_linear_eval_backbone_from_a_file_is_torchvisions(tmp_path):
  model = torch_models.random_resnet("resnet18", seed=6)
  path = str(tmp_path / "r18.safetensors")
  safetensors_numpy.save_file(torch_models.state_arrays(model), path)
  config = load_config("linear_eval.py", "features")
  config.init_from = path
  pretrain = linear_eval.imported_model_config(config)
  assert (pretrain.model, pretrain.width, pretrain.small_image_stem) == (
      "resnet18", 64, False)
  assert (pretrain.dataset, pretrain.image_size) == ("imagenet2012", 224)
  mesh = sharding.make_mesh()
  variables = linear_eval.restore_imported(
      path, pretrain, builders.backbone_of(pretrain), mesh)
  assert variables["params"]["conv1"]["kernel"].sharding == (
      sharding.replicated(mesh))
  images = np.random.default_rng(3).normal(size=(8, 32, 32, 3)).astype(
      np.float32)
  torch_models.assert_relative(
      torch_models.jax_features(pretrain, variables, images),
      torch_models.features(model, images))
  config.pretrain_workdir = str(tmp_path)
  with pytest.raises(UserError, match="pretrain_workdir and config.init_from "
                     "are both set"):
    linear_eval.imported_model_config(config)


def test_linear_eval_of_an_official_style_checkpoint(imported_run, tmp_path,
                                                    fake_tfds_dir):
  _, checkpoint = imported_run
  config = load_config("linear_eval.py", "features")
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
  workdir, _ = imported_run
  config = load_config("linear_eval.py", "features")
  config.update(dict(pretrain_workdir=str(workdir), dataset="cifar10",
                     data_dir=fake_tfds_dir, image_size=16, epochs=1,
                     eval_batch_size=32))
  report = linear_eval.run(config, str(tmp_path / "linear"))
  assert (report["pretrain_workdir"], report["pretrain_step"]) == (
      str(workdir), 2)
  assert "init_from" not in report
  assert 0.0 <= report["top1"] <= report["top5"] <= 1.0


def test_linear_eval_on_features_reads_a_pretraining_workdir(
    tmp_path, eight_device_run):
  """(The image-level variant runs in test_documented_commands, on ImageNet.)"""
  pretrain = eight_device_run[0]
  config = os.path.join(ROOT, "configs", "linear_eval.py") + ":features"
  workdir = tmp_path / "linear"
  result = run(workdir, f"--config.pretrain_workdir={pretrain}",
               "--config.epochs=3", "--config.standardize=True",
               "--config.learning_rate=0.3", config=config)
  report = json.loads((workdir / "linear_eval.json").read_text())
  assert report["pretrain_step"] == 8
  assert 0.0 <= report["top1"] <= report["top5"] <= 1.0
  # Chance is 0.1; 1,000 test digits put 0.12 two standard errors above it.
  assert report["top1"] > 0.12
  assert "linear evaluation: top-1" in result.stdout


def test_linear_eval_without_pretraining_run_says_what_to_do(tmp_path):
  config = os.path.join(ROOT, "configs", "linear_eval.py") + ":features"
  result = run_failing(tmp_path / "x",
                       f"--config.pretrain_workdir={tmp_path}/none",
                       config=config)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: {tmp_path}/none/config.json does not exist; point "
      "config.pretrain_workdir at the --workdir of a pretraining run.")


def _slow_steps(monkeypatch, seconds: float, signal_at: int):
  """Makes the image-level protocol's steps take ``seconds`` on the
  device (a callback the step's metrics wait for), and sends this process
  a SIGINT as step ``signal_at`` is dispatched. Returns the metrics of each
  step dispatched, in order."""
  dispatched = []
  slow = jax.jit(lambda tree: jax.pure_callback(
      lambda x: (time.sleep(seconds), x)[1], tree, tree))
  compiled = linear_eval_images.jit_linear_train_step

  def jit_slow_step(*args, **kwargs):
    step = compiled(*args, **kwargs)

    def slow_step(*step_args):
      state, metrics = step(*step_args)
      dispatched.append(slow(jax.device_put(metrics, jax.devices()[0])))
      if len(dispatched) == signal_at:
        os.kill(os.getpid(), signal.SIGINT)
      return state, dispatched[-1]
    return slow_step

  monkeypatch.setattr(linear_eval_images, "jit_linear_train_step",
                      jit_slow_step)
  return dispatched


def _done(dispatched) -> int:
  """How many of the steps ``dispatched`` have finished on the device."""
  return sum(all(x.is_ready() for x in jax.tree.leaves(metrics))
             for metrics in dispatched)


def test_image_level_protocol_stops_on_sigint_resumes_and_paces_its_count(
    imported_run, tmp_path, fake_tfds_dir, monkeypatch):
  """A SIGINT saves the step reached and the same call resumes from it; the
  progress count (and so its ETA) runs at most STEPS_IN_FLIGHT steps ahead
  of the steps done, however slow they are; a CPU run says once that the
  features variant is faster; and besides the first and the last step, a
  checkpoint is due only after CHECKPOINT_EVERY_SECS (the shipped value)
  or at checkpoint_every_steps."""
  config = load_config("linear_eval.py", "imagenet")
  config.update(dict(pretrain_workdir=str(imported_run[0]),
                     dataset="cifar10", data_dir=fake_tfds_dir,
                     image_size=16, epochs=2, batch_size=8,
                     eval_batch_size=8))
  workdir = tmp_path / "linear"  # 50 images at batch 8: 6 steps an epoch
  reports = []  # (step, how many steps of this call are unfinished)
  monkeypatch.setattr(periodic_actions.ReportProgress, "__call__",
                      lambda self, step: reports.append(
                          (step, len(dispatched) - _done(dispatched))))
  dispatched = _slow_steps(monkeypatch, 0.1, signal_at=3)
  with LoggedWarnings() as logged:
    assert linear_eval.run(config, str(workdir)) == {}
  assert checkpoint_steps(workdir) == [1, 3]
  assert logged.messages.count(linear_eval.CPU_NOTE) == 1
  dispatched = _slow_steps(monkeypatch, 0.1, signal_at=0)
  results = linear_eval.run(config, str(workdir))
  assert 0.0 <= results["top1"] <= results["top5"] <= 1.0
  assert checkpoint_steps(workdir) == [3, 12]
  assert [step for step, _ in reports] == list(range(1, 13))
  assert max(ahead for _, ahead in reports) <= pacing.STEPS_IN_FLIGHT, (
      reports)

  # Step 12 was saved seconds before `now` (less than a minute).
  manager = linear_eval.create_manager(Workdir(workdir), config)
  now = datetime.datetime.now(tz=datetime.timezone.utc)
  for later, due in ((linear_eval.CHECKPOINT_EVERY_SECS - 60, False),
                     (linear_eval.CHECKPOINT_EVERY_SECS, True)):
    clock = types.SimpleNamespace(now=lambda tz=None, s=later: (
        now + datetime.timedelta(seconds=s)))
    monkeypatch.setattr(orbax_checkpoint_manager, "datetime",
                        types.SimpleNamespace(datetime=clock,
                                              timezone=datetime.timezone))
    assert manager.should_save(13) == due, later
  monkeypatch.undo()
  assert not manager.should_save(13)
  assert manager.should_save(config.checkpoint_every_steps)
