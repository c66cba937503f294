"""Helpers shared by several test files (import as ``import helpers``)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from eqco_jax.core import config as config_lib
from eqco_jax.core.training import builders
from eqco_jax.program.files import checkpointing
from eqco_jax.program.files.workdir import Workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "configs", "quickstart.py") + ":tiny"
# The quick start's tiny variant for 8 steps, checkpoints at 4 and 8: the
# session's shared 8-device run (conftest.eight_device_run) and its peers.
SHARED_RUN = ("--config.num_train_steps=8", "--config.checkpoint_every_steps=4",
              "--config.log_every_steps=4")
# Appended to configs/quickstart.py's default variant, these give its tiny
# variant (the README's quick-start and launcher commands run this way).
QUICKSTART_TO_TINY = ("--config.width=4", "--config.head_hidden_dim=32",
                      "--config.head_out_dim=16", "--config.batch_size=32",
                      "--config.linear_eval.epochs=5")
# Appended to the ImageNet recipe (configs/simo.py:imagenet_r50) by the
# README command tests: ResNet-18 (width 64, torchvision's, so that its
# backbone can be exported) at 16x16, batch 8, 4 steps, checkpoints at 2 and
# 4, no final kNN and linear probe (the linear evaluation command follows).
# The README's ImageNet commands add --config.data_dir (the prepared
# ImageNet).
TINY_RECIPE = (
    "--config.model=resnet18", "--config.width=64", "--config.image_size=16",
    "--config.batch_size=8", "--config.eval_batch_size=8",
    "--config.num_train_steps=4", "--config.head_hidden_dim=32",
    "--config.head_out_dim=16", "--config.log_every_steps=2",
    "--config.checkpoint_every_steps=2", "--config.dtype=float32",
    "--config.shuffle_buffer=16", "--config.final_eval=False")
# Long enough that a kill lands mid-run; checkpoints every 10 steps. The
# session's uninterrupted run of it is conftest.long_run.
LONG_STEPS = 60
LONG = (f"--config.num_train_steps={LONG_STEPS}",
        "--config.checkpoint_every_steps=10",
        "--config.log_every_steps=10", "--config.final_eval=False")


def config_module(name: str):
  """``configs/<name>`` (e.g. ``simo.py``) as a module."""
  path = os.path.join(ROOT, "configs", name)
  spec = importlib.util.spec_from_file_location(f"configs_{name[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(name: str, variant: str | None = None
                ) -> ml_collections.ConfigDict:
  """``--config=configs/<name>[:variant]``'s config."""
  module = config_module(name)
  return module.get_config() if variant is None else module.get_config(
      variant)


def default_config(**fields) -> ml_collections.ConfigDict:
  """``default_config()`` with ``fields`` set."""
  config = config_lib.default_config()
  config.update(fields)
  return config


def clusters(rng: np.random.Generator, n: int, dim: int, num_classes: int,
             spread: float) -> tuple[np.ndarray, np.ndarray]:
  """Gaussian blobs around random unit centres: ``(x [n, dim], y [n])``."""
  centres = rng.normal(size=(num_classes, dim))
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  y = rng.integers(0, num_classes, n).astype(np.int32)
  x = centres[y] + spread * rng.normal(size=(n, dim))
  return x.astype(np.float32), y


# ------------------------------------------------- the train step, in process.


IMAGE = (16, 16, 3)


# Each method's own projection head.
HEADS = {"simo": "mlp_bn", "mocov2": "mlp"}


def tiny_config(method: str, **overrides) -> ml_collections.ConfigDict:
  """A whole config with a width-4 ResNet-10 at 16x16 and small settings of
  the fields the train step reads."""
  c = config_lib.default_config()
  c.update(dict(
      method=method, head=HEADS[method], model="resnet10",
      width=4, small_image_stem=True, image_size=IMAGE[0], head_hidden_dim=32,
      head_out_dim=16, temperature=0.2, alpha=256.0, ema_momentum=0.9,
      queue_size=64, batch_size=16, base_learning_rate=0.4, warmup_steps=2,
      bn_group_size=4 if method == "mocov2" else None))
  c.update(overrides)
  return c


def normalise(rng, batch):
  """Preprocess without augmentation: uint8 views to float32."""
  del rng
  scale = lambda x: (x.astype(jnp.float32) / 255.0 - 0.5) / 0.25
  return scale(batch["view1"]), scale(batch["view2"])


def noisy_views(rng, batch):
  """Two views: the image plus independent noise."""
  view1, view2 = normalise(rng, batch)
  r1, r2 = jax.random.split(rng)
  return (view1 + 0.5 * jax.random.normal(r1, view1.shape),
          view2 + 0.5 * jax.random.normal(r2, view2.shape))


def build_pretraining(config, total_steps: int) -> builders.Pretraining:
  """``config``'s parts for a run of ``total_steps`` steps."""
  config = config.copy_and_resolve_references()
  config.num_train_steps = total_steps
  return builders.build_pretraining(config, steps_per_epoch=1)


def build(config, mesh, total_steps=100, preprocess=normalise):
  """``(state, jitted step, encoder)`` of ``config`` on ``mesh``, built as
  a run builds them, with ``preprocess`` making the model's inputs."""
  run = build_pretraining(config, total_steps)
  return (run.initial_state(mesh), run.jit_train_step(mesh, preprocess),
          run.encoder)


def random_batch(seed, batch_size=16):
  """Two independent uint8 views ``[batch_size, *IMAGE]``."""
  rng = np.random.default_rng(seed)
  shape = (batch_size, *IMAGE)
  return {"view1": rng.integers(0, 256, shape, dtype=np.uint8),
          "view2": rng.integers(0, 256, shape, dtype=np.uint8)}


# -------------------------------------------- the program, as a subprocess.


def command(workdir, *overrides, config=QUICK) -> list[str]:
  """``python -m eqco_jax.main`` as a user types it."""
  return [sys.executable, "-m", "eqco_jax.main", f"--config={config}",
          f"--workdir={workdir}", *overrides]


def xla_flags(devices: int | None) -> str:
  """This process's XLA_FLAGS (conftest) with ``devices`` host CPU devices
  (None: no device count)."""
  kept = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                os.environ.get("XLA_FLAGS", "")).split()
  if devices is not None:
    kept.append(f"--xla_force_host_platform_device_count={devices}")
  return " ".join(kept)


def environment(devices: int) -> dict:
  """This environment with ``devices`` host CPU devices."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags(devices)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def run(workdir, *overrides, devices=1, timeout=300, config=QUICK):
  """Runs the program to the end and asserts it succeeded."""
  result = subprocess.run(command(workdir, *overrides, config=config),
                          cwd=ROOT, env=environment(devices),
                          capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def run_failing(workdir, *overrides, config=QUICK):
  """Runs the program, which must fail; returns the completed process."""
  result = subprocess.run(command(workdir, *overrides, config=config),
                          cwd=ROOT, env=environment(1), capture_output=True,
                          text=True, timeout=300)
  assert result.returncode != 0, result.stdout[-2000:]
  return result


def sigint_reaches_children() -> None:
  """Makes the children started from now on take SIGINT (Ctrl-C) as in a
  terminal. A background job of a non-interactive shell ignores SIGINT, and
  its children inherit that; a signal handled here (not ignored) is reset
  to its default action in a child. (A ``preexec_fn`` would do it in the
  child, but only by a fork of this multithreaded process.)"""
  if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def start(workdir, *overrides) -> subprocess.Popen:
  """Starts the program in the background (1 device), SIGINT as typed in a
  terminal."""
  sigint_reaches_children()
  return subprocess.Popen(command(workdir, *overrides), cwd=ROOT,
                          env=environment(1), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def checkpoint_steps(workdir) -> list[int]:
  """The steps of the complete checkpoints in ``workdir``."""
  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    return []
  return sorted(int(name) for name in os.listdir(path) if name.isdigit())


def load_state(workdir, step):
  """The raw arrays of a checkpoint's train state, on one device."""
  return checkpointing.load_state_arrays(Workdir(workdir), step)


def save_as_before_digests(workdir, step, state, config) -> None:
  """Saves checkpoint ``step`` of ``state`` as the program did before
  checkpoints had digests: the items ``state`` and ``identity`` only."""
  with ocp.CheckpointManager(Workdir(workdir).checkpoints, item_handlers={
      "state": ocp.StandardCheckpointHandler(),
      "identity": ocp.JsonCheckpointHandler()}) as manager:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        identity=ocp.args.JsonSave(checkpointing.identity(config))))
    manager.wait_until_finished()


def assert_same_state_up_to_reassociation(single, workdir, step=8) -> None:
  """Checkpoint ``step`` of ``workdir`` is that of the run in ``single``
  (another process layout over as many devices), up to the reassociation
  noise of the sums that 8 SGD steps amplify (measured: params 6e-5,
  optimizer momentum 2e-3 relative in norm)."""
  state_one, state_two = load_state(single, step), load_state(workdir, step)
  assert int(state_two["step"]) == step
  for field, tolerance in (("params", 1e-3), ("batch_stats", 1e-3),
                           ("momentum_params", 1e-3), ("opt_state", 1e-2)):
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(state_one[field])])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(state_two[field])])
    assert np.linalg.norm(a - b) <= tolerance * np.linalg.norm(a), field


def assert_same_tree(a, b, rtol=0.0):
  """Same paths, and leaves equal to ``rtol``."""
  leaves_a = jax.tree_util.tree_leaves_with_path(a)
  leaves_b = jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
  for (path, x), (_, y) in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               err_msg=jax.tree_util.keystr(path))


def wait_for_checkpoint(process, workdir, timeout=240) -> None:
  """Waits until ``workdir`` holds a complete checkpoint."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if checkpoint_steps(workdir):
      return
    if process.poll() is not None:
      raise AssertionError("run ended before its first checkpoint: "
                           + process.stderr.read()[-2000:])
    time.sleep(0.05)
  process.kill()
  raise AssertionError("no checkpoint appeared in time")


def example_ids(images) -> list[int]:
  """Example indices written into pixel (0, 0) by the fake_tfds_dir fixture."""
  return [int(i) for i in np.asarray(images)[:, 0, 0, 0]]


# ------------------------------------------- the data layer's numpy batches.


def pretrain_numpy(config, **options):
  """This process's pretraining batches of ``config``'s source, as numpy
  (``pipeline.pretrain_dataset``'s options)."""
  from eqco_jax.data import pipeline, sources  # pylint: disable=g-import-not-at-top
  return pipeline.pretrain_dataset(sources.get_source(config),
                                   **options).as_numpy_iterator()


def eval_numpy(config, **options):
  """This process's evaluation batches of ``config``'s source, as numpy
  (``pipeline.eval_dataset``'s options; ``batch_size`` defaults to
  ``config.eval_batch_size``)."""
  from eqco_jax.data import pipeline, sources  # pylint: disable=g-import-not-at-top
  options.setdefault("batch_size", config.eval_batch_size)
  return pipeline.eval_dataset(sources.get_source(config),
                               **options).as_numpy_iterator()


def data_config(**fields) -> ml_collections.ConfigDict:
  """A config of the embedded digits at their own size (32), batches of
  256, with ``fields`` set."""
  config = config_lib.default_config()
  config.update(dict(dataset="digits", image_size=32, shuffle_buffer=10_000))
  config.update(fields)
  return config


def folder_config(root, **overrides) -> ml_collections.ConfigDict:
  """:func:`data_config` of the image folder ``root``, at 16x16, batches of
  8, evaluation batches of 6, with ``overrides``."""
  return data_config(**dict(dict(
      dataset="image_folder", data_dir=str(root), image_size=16,
      batch_size=8, eval_batch_size=6), **overrides))


def run_python(*lines: str, timeout: int = 120) -> subprocess.CompletedProcess:
  """``python -c`` of ``lines`` in the checkout, which must succeed."""
  result = subprocess.run([sys.executable, "-c", "\n".join(lines)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-2000:]
  return result


class LoggedWarnings(logging.Handler):
  """While in a ``with`` block, keeps the messages of WARNING (or
  ``level``) and above logged through ``loggers`` (absl's by default) in
  ``messages``."""

  def __init__(self, *loggers: str, level: int = logging.WARNING):
    super().__init__(level)
    self.loggers = [logging.getLogger(name) for name in loggers or ("absl",)]
    self.messages: list[str] = []
    self._levels: list[int] = []

  def emit(self, record: logging.LogRecord) -> None:
    self.messages.append(record.getMessage())

  def __enter__(self) -> LoggedWarnings:
    for logger in self.loggers:
      self._levels.append(logger.level)
      logger.setLevel(min(logger.getEffectiveLevel(), self.level))
      logger.addHandler(self)
    return self

  def __exit__(self, *exc) -> None:
    for logger, level in zip(self.loggers, self._levels):
      logger.removeHandler(self)
      logger.setLevel(level)


@contextlib.contextmanager
def mocked_tfds(name: str, data_dir, splits: tuple[str, ...],
                num_examples: int):
  """``tfds.testing.mock_data`` for dataset ``name`` in ``data_dir``: its
  metadata written there with ``splits`` of ``num_examples`` each (the mock
  yields that many for any split; the metadata agrees), so that the source
  finds it prepared. Yields ``data_dir`` as a string."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder(name, data_dir=str(data_dir))
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=split, shard_lengths=[num_examples],
                          num_bytes=0) for split in splits]))
  tf.io.gfile.makedirs(builder.data_dir)
  builder.info.write_to_directory(builder.data_dir)
  with tfds.testing.mock_data(num_examples=num_examples,
                              data_dir=str(data_dir),
                              policy=tfds.testing.MockPolicy.USE_FILES):
    yield str(data_dir)
