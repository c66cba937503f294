"""The core, checked where only its own dependencies are installed.

``python tests/check_core.py`` imports every module of ``eqco_jax.core`` and
the public paths ``eqco_jax.losses`` and ``eqco_jax.models``, runs the
losses, three SiMo steps on 8 host CPU devices, the sharded kNN and a linear
evaluation on features, and prints ``OK`` and the JAX version. ``tests/scenarios/test_install.py`` runs it in a fresh environment with
the pinned versions; the README says how the oldest versions were checked
with it.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = " ".join([  # the caller's flags, then the count
    os.environ.get("XLA_FLAGS", ""),
    "--xla_force_host_platform_device_count=8"]).strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import importlib
import pathlib

import jax
import numpy as np

from eqco_jax import losses
import eqco_jax
from eqco_jax.core import config as config_lib
from eqco_jax.core import sharding
from eqco_jax.core.evaluate import knn
from eqco_jax.core.evaluate import linear_eval_features
from eqco_jax.core.training import builders


def import_every_core_module() -> int:
  core = pathlib.Path(eqco_jax.__file__).parent / "core"
  names = ["eqco_jax.models"] + [
      ".".join(("eqco_jax", *path.relative_to(core.parent)
                .with_suffix("").parts)).removesuffix(".__init__")
      for path in sorted(core.rglob("*.py"))]
  for name in names:
    importlib.import_module(name)
  return len(names)


def simo_steps(mesh) -> float:
  """The loss after three steps of a tiny SiMo run on ``mesh``."""
  c = config_lib.default_config()
  c.update(dict(
      model="resnet10", width=4, small_image_stem=True, image_size=16,
      head_hidden_dim=16, head_out_dim=8, batch_size=16))
  c.augment.on_device = True
  config_lib.validate(c, mesh.devices.size)
  run = builders.build_pretraining(c, steps_per_epoch=10)
  state = run.initial_state(mesh)
  step = run.jit_train_step(mesh, run.preprocess(mean=(0.5,) * 3,
                                                 std=(0.5,) * 3))
  views = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3),
                                            dtype=np.uint8)
  batch = {"view1": sharding.to_global_array(views, mesh),
           "view2": sharding.to_global_array(views[::-1].copy(), mesh)}
  for _ in range(3):
    state, metrics = step(state, batch)
  loss = float(metrics["loss"])
  assert np.isfinite(loss) and int(state.step) == 3, loss
  return loss


def main() -> None:
  print("core modules", import_every_core_module())
  mesh = sharding.make_mesh()
  assert mesh.devices.size == 8, mesh
  print("simo loss", simo_steps(mesh))
  q = losses.l2_normalize(jax.random.normal(jax.random.key(1), (8, 4)))
  k = losses.l2_normalize(jax.random.normal(jax.random.key(2), (8, 4)))
  print("in_batch_eqco", float(losses.in_batch_eqco(
      q, k, temperature=0.2, alpha=64.0, num_negatives=3,
      rng=jax.random.key(3))))
  print("eqco_infonce", float(losses.eqco_infonce(
      q, k, k[:5], temperature=0.2, alpha=64.0)))
  rng = np.random.default_rng(0)
  bank = rng.normal(size=(64, 8)).astype(np.float32)
  labels = rng.integers(0, 4, 64).astype(np.int32)
  sharded = knn.knn_accuracy_sharded(
      sharding.to_global_array(bank, mesh),
      sharding.to_global_array(labels, mesh), bank[:16], labels[:16],
      mesh=mesh, num_classes=4, k=5)
  assert sharded == knn.knn_accuracy(bank, labels, bank[:16], labels[:16],
                                     num_classes=4, k=5)
  linear = linear_eval_features.linear_eval_on_features(
      bank, labels, bank, labels, num_classes=4, rng=jax.random.key(0),
      epochs=2, batch_size=256, learning_rate=30.0, momentum=0.9,
      weight_decay=0.0, decay_epochs=(1,))
  print("knn", sharded, "linear", linear["top1"])
  print("OK", jax.__version__)


if __name__ == "__main__":
  main()
