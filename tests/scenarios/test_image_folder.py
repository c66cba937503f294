"""The README's "Pretrain on your own images" commands, run as typed (with
the tiny recipe appended) on a folder of real JPEGs (varied sizes, a PNG, a
truncated JPEG, unlabelled images) and on a prepared TFDS dataset read as
``tfds:NAME``.

The same pretraining on 2 processes x 1 device (the local one: 1 x 2), with
its folder and its workdir in a bucket of a local GCS emulator (the real
fake-gcs-server binary; gcsfs reaches it through ``STORAGE_EMULATOR_HOST``,
TensorStore's checkpoint arrays through ``TENSORSTORE_GCS_HTTP_URL``),
SIGKILLed after a checkpoint and resumed, ends where the local one did, bit
for bit; its linear evaluation reads the bucket and writes its results
there; nothing is written locally."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import numpy as np
import pytest

import documented as docs
import fakes
import gcs_emulator
import tensorboard_loaders
from documented import documented
from helpers import TINY_RECIPE, assert_same_tree, environment, load_state

PRETRAIN = (r"python -m eqco_jax\.main --config=configs/simo\.py:imagenet_r50 "
            r"--config\.dataset=image_folder --config\.data_dir=\S+ "
            r"--workdir=runs/simo_folder")
# The README's laptop line: the same recipe with a smaller model, images and
# batch, all of which FOLDER_RUN sets again (so both runs are one run).
LAPTOP = (r"python -m eqco_jax\.main --config=configs/simo\.py:imagenet_r50 "
          r"--config\.dataset=image_folder --config\.data_dir=\S+ "
          r"--workdir=runs/folder_laptop .*")
# The tiny recipe with a width-4 ResNet-10 (a step of TINY_RECIPE's
# ResNet-18 takes about a second here, this one's a sixth).
SMALL = (*TINY_RECIPE, "--config.model=resnet10", "--config.width=4",
         "--config.small_image_stem=True")
# 36 images at batch 8: 4 steps an epoch; checkpoints at 4, 8, 12, 16; the
# final kNN and linear evaluation on the 32 labelled train and 12 val images.
STEPS = 16
FOLDER_RUN = (*SMALL, f"--config.num_train_steps={STEPS}",
              "--config.checkpoint_every_steps=4", "--config.final_eval=True",
              "--config.linear_eval.epochs=2")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
  return docs.make_sandbox(tmp_path_factory.mktemp("folder_sandbox"))


def pretrain_in(sandbox, data_dir: str, workdir: str, env: dict,
                **popen) -> list[str] | subprocess.Popen:
  command = " ".join([documented(PRETRAIN), *FOLDER_RUN,
                      f"--config.data_dir={data_dir}",
                      f"--workdir={workdir}"])
  if popen:
    return subprocess.Popen(["bash", "-c", command], cwd=sandbox, env=env,
                            **popen)
  return docs.shell(command, sandbox, env=env)


def pretrain_on_two_processes(cwd, data_dir: str, workdir: str,
                              env: dict) -> list[subprocess.Popen]:
  """The README's laptop command on 2 processes x 1 device, with
  ``--coordinator_address=localhost:PORT --num_processes=2 --process_id=I``
  appended (as on two hosts), and without the final evaluation (the README's
  linear evaluation reads this run afterwards)."""
  command = " ".join([documented(LAPTOP), *FOLDER_RUN,
                      f"--config.data_dir={data_dir}", f"--workdir={workdir}",
                      f"--coordinator_address=localhost:{fakes.free_port()}",
                      "--num_processes=2", "--config.final_eval=False"])
  return [subprocess.Popen(["bash", "-c", f"{command} --process_id={i}"],
                           cwd=cwd, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for i in (0, 1)]


@pytest.mark.xdist_group("processes")  # two program processes: see conftest
def test_pretraining_and_linear_evaluation_on_an_image_folder(
    sandbox, image_folder, emulator, tmp_path):
  result = pretrain_in(sandbox, str(image_folder.root), "runs/simo_folder",
                       environment(2))
  assert result.returncode == 0, result.stderr[-3000:]
  workdir = sandbox / "runs/simo_folder"
  summary = json.loads((workdir / "summary.json").read_text())
  assert (summary["dataset"], summary["steps"], summary["num_devices"]) == (
      "image_folder", STEPS, 2)
  # The truncated JPEG: skipped wherever a batch held it, and left out of
  # the evaluation of both backbones (it is a labelled train image).
  assert summary["skipped_records"] >= 1
  assert summary["eval_skipped_records"] == 1
  assert summary["baseline_eval_skipped_records"] == 1
  assert image_folder.truncated in result.stderr
  # Quiet: the truncated JPEG is refused before TensorFlow's decoder (no
  # libjpeg line), its skips said in at most one line a log interval
  # (TINY_RECIPE: every 2 steps).
  assert not [line for line in result.stderr.splitlines()
              if "JPEG" in line and "Skipped " not in line]
  # The total in the printed table, whose columns are the README's.
  assert (f", {summary['skipped_records']} unreadable image(s) skipped\n"
          in result.stdout)
  assert "linear top-5" in result.stdout
  intervals = re.findall(r"Skipped \d+ unreadable image\(s\) in the batches "
                         r"of steps (\d+)-(\d+)", result.stderr)
  assert intervals and len(set(intervals)) == len(intervals) == (
      result.stderr.count("Skipped "))
  assert all(int(last) % 2 == 0 and int(last) - int(first) == 1
             for first, last in intervals)
  assert 0.0 <= summary["knn_top1"] <= 1.0
  lists = {name: json.loads((workdir / "file_lists" / f"{name}.json")
                            .read_text()) for name in ("train", "val")}
  assert (len(lists["train"]), len(lists["val"])) == (36, 12)

  # The same run on 2 processes x 1 device, its folder and its workdir in a
  # bucket: both processes SIGKILLed after a checkpoint, then the same
  # commands again; the README's linear evaluation in the bucket too;
  # nothing written locally. The truncated JPEG's place is taken within its
  # device's rows, the same rows for 1 x 2 and 2 x 1: the same final state.
  for path in sorted(image_folder.root.rglob("*")):
    if path.is_file():
      gcs_emulator.write_object(
          emulator, f"folder/{path.relative_to(image_folder.root)}",
          path.read_bytes())
  env = gcs_emulator.client_env(emulator, environment(1))
  bucket = f"gs://{gcs_emulator.BUCKET}"
  killed = f"{bucket}/runs/simo_folder"
  cwd = sandbox / "cwd"
  cwd.mkdir()
  docs.make_sandbox(cwd)
  before = sorted(cwd.iterdir())
  processes = pretrain_on_two_processes(cwd, f"{bucket}/folder", killed, env)
  try:
    deadline = time.time() + 300
    while not checkpoints_in_bucket(emulator, "runs/simo_folder"):
      for process in processes:
        assert process.poll() is None, process.communicate()[1][-3000:]
      assert time.time() < deadline, "no checkpoint reached the bucket"
      time.sleep(0.05)
  finally:
    for process in processes:
      process.send_signal(signal.SIGKILL)
      process.communicate()
  assert max(checkpoints_in_bucket(emulator, "runs/simo_folder")) < STEPS, (
      "the run ended first")
  processes = pretrain_on_two_processes(cwd, f"{bucket}/folder", killed, env)
  try:
    outputs = [process.communicate(timeout=300)[1] for process in processes]
  finally:
    for process in processes:
      process.kill()
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output[-3000:]
    assert "Resumed from the checkpoint of step" in output
  assert "[process 1/2]" in outputs[1]
  assert_same_tree(load_state(workdir, STEPS), load_state(killed, STEPS))
  again = json.loads(gcs_emulator.read_object(emulator,
                                              "runs/simo_folder/summary.json"))
  for field in ("final_loss", "skipped_records"):
    assert again[field] == summary[field], field
  names = gcs_emulator.objects(emulator, "runs/simo_folder/")
  for expected in ("config.json", "progress.json", "file_lists/train.json"):
    assert f"runs/simo_folder/{expected}" in names
  # Its events as TensorBoard reads them: each logged step once, the killed
  # run's too (uploaded before each checkpoint), as in the local run.
  for name in names:
    if "/events.out.tfevents." in name:
      (tmp_path / name.rsplit("/", 1)[1]).write_bytes(
          gcs_emulator.read_object(emulator, name))
  assert len(list(tmp_path.iterdir())) == 2  # one per start
  assert tensorboard_loaders.python_loader_scalars(tmp_path, "loss") == (
      tensorboard_loaders.python_loader_scalars(workdir, "loss"))
  # The README's linear evaluation, pointed at the run in the bucket.
  linear = docs.shell(" ".join([
      documented(r"python -m eqco_jax\.main --config=configs/linear_eval\.py:"
                 r"imagenet --config\.pretrain_workdir=runs/simo_folder "
                 r"--workdir=runs/simo_folder_linear"),
      "--config.epochs=1", "--config.batch_size=8",
      "--config.eval_batch_size=8", f"--config.pretrain_workdir={killed}",
      f"--workdir={bucket}/runs/simo_folder_linear"]), cwd, env=env)
  assert linear.returncode == 0, linear.stderr[-3000:]
  report = json.loads(gcs_emulator.read_object(
      emulator, "runs/simo_folder_linear/linear_eval.json"))
  assert report["pretrain_step"] == STEPS
  assert 0.0 <= report["top1"] <= report["top5"] <= 1.0
  assert report["eval_skipped_records"] == 0  # (the truncated one trains)
  assert sorted(cwd.iterdir()) == before  # nothing written locally


def checkpoints_in_bucket(host: str, run: str) -> list[int]:
  """Steps whose checkpoint orbax finalized (on GCS: the step folder's own
  commit_success.txt, written after its items')."""
  prefix = f"{run}/checkpoints/"
  steps = set()
  for name in gcs_emulator.objects(host, prefix):
    step, _, rest = name[len(prefix):].partition("/")
    if step.isdigit() and rest == "commit_success.txt":
      steps.add(int(step))
  return sorted(steps)


@pytest.fixture(scope="module")
def flowers_tfds(tmp_path_factory) -> str:
  """A TFDS data_dir holding a small, really prepared 'oxford_flowers102'
  (its own features; 16 / 8 / 8 real images of varied sizes)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  data_dir = str(tmp_path_factory.mktemp("flowers"))
  builder = tfds.builder("oxford_flowers102", data_dir=data_dir)
  rng = np.random.default_rng(3)
  splits = {}
  for split, size in (("train", 16), ("validation", 8), ("test", 8)):
    images = [rng.integers(0, 256, (int(h), int(w), 3), np.uint8)
              for h, w in rng.integers(40, 120, (size, 2))]
    splits[split] = tf.data.Dataset.from_generator(
        lambda images=images, split=split: (
            {"image": image, "label": i % 102,
             "file_name": f"{split}_{i}.jpg"}
            for i, image in enumerate(images)),
        output_signature={
            "image": tf.TensorSpec((None, None, 3), tf.uint8),
            "label": tf.TensorSpec((), tf.int64),
            "file_name": tf.TensorSpec((), tf.string)})
  tfds.dataset_builders.TfDataBuilder(
      name="oxford_flowers102", version=str(builder.info.version),
      split_datasets=splits, features=builder.info.features,
      data_dir=data_dir).download_and_prepare()
  return data_dir


def test_any_tfds_dataset_by_name_as_documented(sandbox, flowers_tfds):
  command = documented(
      r"python -m eqco_jax\.main --config=configs/simo\.py:imagenet_r50 "
      r"--config\.dataset=tfds:oxford_flowers102 --config\.data_dir=\S+ "
      r"--workdir=runs/simo_flowers")
  result = docs.shell(" ".join([command, *SMALL,
                                f"--config.data_dir={flowers_tfds}"]),
                      sandbox, env=environment(2))
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((sandbox / "runs/simo_flowers/summary.json")
                       .read_text())
  assert (summary["dataset"], summary["steps"]) == ("tfds:oxford_flowers102",
                                                   4)


def test_a_folder_without_labels_is_refused_before_training(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from eqco_jax.core.errors import UserError  # pylint: disable=g-import-not-at-top
  from eqco_jax.program.run import train  # pylint: disable=g-import-not-at-top
  import helpers  # pylint: disable=g-import-not-at-top

  for i in range(8):
    (tmp_path / "data" / "train").mkdir(parents=True, exist_ok=True)
    (tmp_path / "data" / "train" / f"{i}.jpg").write_bytes(
        tf.io.encode_jpeg(np.zeros((8, 8, 3), np.uint8)).numpy())
  config = helpers.config_module("quickstart.py").get_config("tiny")
  config.update(dict(dataset="image_folder",
                     data_dir=str(tmp_path / "data"), batch_size=8,
                     eval_batch_size=8))
  with pytest.raises(UserError, match="need labelled images"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()
