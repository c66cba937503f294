"""Test-wide settings: 8 host CPU devices, quiet TensorFlow, a compilation cache.

These must be set before jax or tensorflow is imported anywhere.
"""

import os

# XLA's CPU backend compiling for speed of compilation: without LLVM's
# optimisation passes and with XLA's classic loop emitters instead of its
# newer fusion emitters, the tests' tiny programs compile about twice as fast
# and run nearly as fast. Every process of the suite (programs, launchers,
# fakes) keeps these flags and only sets its device count after them.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                      "--xla_cpu_use_fusion_emitters=false "
                      "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.expanduser("~"), ".cache", "eqco_jax", "jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402  (after the environment above)

jax.config.update("jax_platforms", "cpu")


# ------------------------------------------------------------- scheduling.

# With pytest-xdist (setup.cfg: two workers, --dist loadgroup) the tests that
# start several program processes at once carry xdist_group("processes"):
# they run one after another on one worker, first the one that makes the 1 x
# 8 run they are held to. Two of them at once put four processes of 4
# devices on two cores, and their collectives wait on descheduled peers.
# The other worker starts with the export tests' group, then the heaviest
# single tests below, longest first, so that both end together.
HEAVY_FIRST = (
    "test_documented_commands.py::test_imagenet_pretraining_then_linear_eval",
    "test_documented_commands.py::test_the_k_sweep",
    "test_pretraining.py::test_quickstart_as_documented",
    "test_pretraining.py::test_damage_and_kills",
    "test_documented_commands.py::test_benchmark_commands",
    "test_install.py::test_core_installs_alone",
    "test_train_step.py::test_a_hundred_or_more_steps_lower_the_loss",
    "test_documented_commands.py::test_the_device_check",
    "test_stopping.py::test_a_diverging_run",
    "test_pretraining.py::test_ctrl_c_then",
    "test_pretraining.py::test_a_run_counts",
    "test_train_step.py::test_one_device_and_eight_devices_agree",
)


def pytest_collection_modifyitems(items) -> None:
  """HEAVY_FIRST's tests first, in its order; the rest as collected."""
  def rank(item) -> int:
    name = f"{item.path.name}::{item.name}"
    return next((i for i, prefix in enumerate(HEAVY_FIRST)
                 if name.startswith(prefix)), len(HEAVY_FIRST))

  items.sort(key=rank)


# ---------------------------------------------------------------- data fixtures.

import pathlib  # noqa: E402
from typing import NamedTuple  # noqa: E402

import pytest  # noqa: E402

FAKE_CIFAR_SIZES = {"train": 50, "test": 23}


@pytest.fixture(scope="session")
def fake_tfds_dir(tmp_path_factory) -> str:
  """A TFDS data_dir holding a tiny, really prepared 'cifar10' (50 / 23).

  Written through ``tfds.dataset_builders.TfDataBuilder`` with cifar10's
  features and version, so the real Cifar10 builder reads it. Pixel (0, 0) of
  example i holds (i, split number, 0); its label is i % 10.
  """
  import numpy as np
  import tensorflow as tf
  import tensorflow_datasets as tfds

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  features = tfds.builder("cifar10", data_dir=data_dir).info.features
  rng = np.random.default_rng(0)
  splits = {}
  for split_number, (split, size) in enumerate(FAKE_CIFAR_SIZES.items()):
    images = rng.integers(0, 256, (size, 32, 32, 3), dtype=np.uint8)
    images[:, 0, 0] = np.stack([np.arange(size), np.full(size, split_number),
                                np.zeros(size)], -1)
    splits[split] = tf.data.Dataset.from_tensor_slices({
        "id": [f"{split}_{i}" for i in range(size)],
        "image": images,
        "label": np.arange(size) % 10})
  tfds.dataset_builders.TfDataBuilder(
      name="cifar10", version="3.0.2", split_datasets=splits,
      features=features, data_dir=data_dir).download_and_prepare()
  return data_dir


class JpegDataset(NamedTuple):
  """A prepared TFDS dataset with one truncated JPEG: where it is, and the
  truncated record's id."""
  data_dir: str
  truncated_id: str


@pytest.fixture(scope="session")
def jpeg_tfds(tmp_path_factory) -> JpegDataset:
  """A prepared 'cifar10' (50 train / 20 test) whose images are JPEG bytes
  of random noise; train record 7 holds only the first 40% of its JPEG."""
  import numpy as np
  import tensorflow as tf
  import tensorflow_datasets as tfds

  data_dir = str(tmp_path_factory.mktemp("jpeg_tfds"))
  features = tfds.builder("cifar10", data_dir=data_dir).info.features
  rng = np.random.default_rng(1)
  splits, truncated = {}, 7
  for split, size in (("train", 50), ("test", 20)):
    images = [tf.io.encode_jpeg(rng.integers(0, 256, (32, 32, 3), np.uint8),
                                quality=90).numpy() for _ in range(size)]
    if split == "train":
      images[truncated] = images[truncated][:len(images[truncated]) * 2 // 5]
    # Bytes are stored as they are (the Image feature encodes only arrays).
    splits[split] = tf.data.Dataset.from_tensor_slices({
        "id": [f"{split}_{i}" for i in range(size)], "image": images,
        "label": np.arange(size) % 10})
  builder = tfds.dataset_builders.TfDataBuilder(
      name="cifar10", version="3.0.2", split_datasets=splits,
      features=features, data_dir=data_dir)
  builder.download_and_prepare()
  # Its record id, found by decoding every record (TFDS orders records by a
  # hash of their key).
  bad = []
  for record in builder.as_dataset(
      split="train", read_config=tfds.ReadConfig(add_tfds_id=True),
      decoders={"image": tfds.decode.SkipDecoding()}):
    try:
      tf.io.decode_jpeg(record["image"])
    except tf.errors.InvalidArgumentError:
      bad.append(record["tfds_id"].numpy().decode())
  assert len(bad) == 1, bad
  return JpegDataset(data_dir, bad[0])


# ------------------------------------------------------- shared program runs.

def once_per_session(tmp_path_factory, worker_id: str, name: str, make):
  """``make(folder)``'s JSON-able result, made once per test session even
  with pytest-xdist: the first worker to ask makes it, under a file lock, in
  a ``name`` folder that all workers share; the others wait and read it."""
  import json
  import shutil

  import filelock

  shared = tmp_path_factory.getbasetemp()
  if worker_id != "master":  # each xdist worker has a folder of the run's
    shared = shared.parent
  folder, record = shared / name, shared / f"{name}.json"
  with filelock.FileLock(f"{record}.lock"):
    if not record.exists():  # first, or after a worker's failed attempt
      shutil.rmtree(folder, ignore_errors=True)
      folder.mkdir()
      record.write_text(json.dumps(make(folder)))
  return folder, json.loads(record.read_text())


@pytest.fixture(scope="session")
def eight_device_run(tmp_path_factory, worker_id):
  """One finished run of SHARED_RUN on 8 host devices, with its final kNN
  and linear probe, started as launch/gpu_host.sh's usage line (one process
  on every device; documented.LAUNCHER_RECIPE): ``(workdir, completed
  process)``, made once per session. Tests read it and must not change it
  (copy it first)."""
  import subprocess

  import documented
  from helpers import ROOT, SHARED_RUN, environment

  def make(workdir):
    command = documented.usage_line(r"launch/gpu_host\.sh .*", workdir,
                                    **documented.LAUNCHER_RECIPE)
    result = subprocess.run(["bash", *command, "--", *SHARED_RUN], cwd=ROOT,
                            env=environment(8), capture_output=True,
                            text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return [result.args, result.returncode, result.stdout, result.stderr]

  workdir, result = once_per_session(tmp_path_factory, worker_id,
                                     "eight_devices", make)
  return workdir, subprocess.CompletedProcess(*result)


@pytest.fixture(scope="session")
def long_run(tmp_path_factory, worker_id):
  """The workdir of one uninterrupted run of LONG (1 device), which killed
  and resumed runs must end equal to, made once per session. Read-only for
  tests."""
  from helpers import LONG, run

  def make(folder):
    run(folder / "run", *LONG)
    return str(folder / "run")

  _, workdir = once_per_session(tmp_path_factory, worker_id, "long_run", make)
  return pathlib.Path(workdir)


# A 2-step quick-start run of a ResNet-18 with torchvision's stem and width,
# at a learning rate that leaves the weights where init_from put them.
TINY_RESNET18 = (
    "--config.model=resnet18", "--config.width=64",
    "--config.small_image_stem=False", "--config.num_train_steps=2",
    "--config.batch_size=8", "--config.final_eval=False",
    "--config.base_learning_rate=1e-9", "--config.checkpoint_every_steps=2",
    "--config.log_every_steps=1")


@pytest.fixture(scope="session")
def imported_run(tmp_path_factory, worker_id):
  """``(workdir, checkpoint)``: TINY_RESNET18 started (``init_from``) from a
  MoCo-style checkpoint of a fresh torchvision ResNet-18
  (``torch_models.torchvision_resnet18(IMPORTED_SEED)``), made once per
  session. Read-only for tests."""
  import torch

  import torch_models
  from helpers import run

  def make(folder):
    model = torch_models.torchvision_resnet18(torch_models.IMPORTED_SEED)
    checkpoint = str(folder / "checkpoint_0199.pth.tar")
    torch.save({"state_dict": {f"module.encoder_q.{k}": v
                               for k, v in model.state_dict().items()}},
               checkpoint)
    run(folder / "run", *TINY_RESNET18, f"--config.init_from={checkpoint}")
    return [str(folder / "run"), checkpoint]

  _, (workdir, checkpoint) = once_per_session(tmp_path_factory, worker_id,
                                              "imported", make)
  return pathlib.Path(workdir), checkpoint


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
  """A local GCS emulator with an empty bucket ``gcs_emulator.BUCKET``, one
  per worker: its base URL (this process's GCS clients use it)."""
  import gcs_emulator

  with gcs_emulator.running_emulator(tmp_path_factory.mktemp("gcs")) as host:
    yield host


IMAGENET_CLASSES = ("n01440764", "n01443537", "n01484850", "n01491361")


@pytest.fixture(scope="session")
def imagenet_manual_dir(tmp_path_factory) -> str:
  """``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar`` as ImageNet
  ships them, with real JPEGs of varied sizes (40-119 px a side): a tar of
  per-synset tars of 6 images for 4 classes, and 8 validation images."""
  import io
  import tarfile

  import numpy as np
  import tensorflow as tf

  rng = np.random.default_rng(0)
  manual_dir = tmp_path_factory.mktemp("imagenet_tars")

  def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))

  def jpeg():
    height, width = rng.integers(40, 120, 2)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return tf.io.encode_jpeg(pixels).numpy()

  with tarfile.open(manual_dir / "ILSVRC2012_img_train.tar", "w") as train:
    for synset in IMAGENET_CLASSES:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as synset_tar:
        for i in range(6):
          add(synset_tar, f"{synset}_{i}.JPEG", jpeg())
      add(train, f"{synset}.tar", inner.getvalue())
  with tarfile.open(manual_dir / "ILSVRC2012_img_val.tar", "w") as val:
    for i in range(8):
      add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg())
  return str(manual_dir)


class ImageFolder(NamedTuple):
  """A folder of images as torchvision's ImageFolder reads it: its root, the
  truncated file and the unlabelled files (paths relative to ``train/``)."""
  root: pathlib.Path
  truncated: str
  unlabelled: tuple[str, ...]


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> ImageFolder:
  """``train/CLASS/*`` (8 per class: 7 JPEGs and, in the last class, a PNG
  for one of them), 4 unlabelled images directly in ``train/`` and
  ``val/CLASS/*`` (3 per class): real images of 40-119 px a side, noise
  with a class-dependent mean colour; one train JPEG holds only the first
  40% of its bytes."""
  import numpy as np
  import tensorflow as tf

  root = tmp_path_factory.mktemp("image_folder")
  rng = np.random.default_rng(2)

  def image(label: int) -> np.ndarray:
    height, width = rng.integers(40, 120, 2)
    noise = rng.integers(0, 96, (height, width, 3))
    return (noise + 40 * label).astype(np.uint8)

  def write(relative: str, label: int) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    encode = (tf.io.encode_png if relative.endswith(".png")
              else tf.io.encode_jpeg)
    path.write_bytes(encode(image(label)).numpy())

  for label, name in enumerate(IMAGENET_CLASSES):
    for i in range(8):
      last = label == len(IMAGENET_CLASSES) - 1 and i == 7
      write(f"train/{name}/{name}_{i}.{'png' if last else 'JPEG'}", label)
    for i in range(3):
      write(f"val/{name}/ILSVRC2012_val_{label * 3 + i:08d}.JPEG", label)
  unlabelled = tuple(f"photo_{i}.jpg" for i in range(4))
  for i, name in enumerate(unlabelled):
    write(f"train/{name}", i % 4)
  truncated = f"{IMAGENET_CLASSES[1]}/{IMAGENET_CLASSES[1]}_3.JPEG"
  data = (root / "train" / truncated).read_bytes()
  (root / "train" / truncated).write_bytes(data[:len(data) * 2 // 5])
  return ImageFolder(root, truncated, unlabelled)


@pytest.fixture(scope="session")
def quickstart_as_documented(tmp_path_factory, worker_id):
  """The README's quick-start command, run as typed in a sandbox (the
  install checked offline against this environment) with the tiny
  variant's sizes and SHARED_RUN appended, on one device, made once per
  session: ``(workdir, completed process)``. Read-only for tests."""
  import subprocess

  import documented
  from helpers import QUICKSTART_TO_TINY, SHARED_RUN, environment

  def make(folder):
    sandbox = documented.make_sandbox(folder)
    command = documented.readme_commands()[0]
    assert command.startswith("pip install ") and (
        "configs/quickstart.py" in command)
    # The install is checked offline: every requirement must already be met.
    command = command.replace(
        "pip install ", "pip install --no-index --dry-run --no-build-isolation ",
        1)
    result = documented.shell(" ".join([command, *QUICKSTART_TO_TINY,
                                        *SHARED_RUN]), sandbox,
                              env=environment(1))
    assert result.returncode == 0, result.stderr[-3000:]
    return [str(result.args), result.returncode, result.stdout, result.stderr]

  sandbox, result = once_per_session(tmp_path_factory, worker_id,
                                     "quickstart", make)
  return sandbox / "runs" / "quickstart", subprocess.CompletedProcess(*result)
