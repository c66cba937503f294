"""The three layers: core, data, program, each a folder of eqco_jax. What
each may import, checked on the source; the public paths at the top only
hand names on; the core (with the step benchmark) run where TensorFlow,
TFDS and clu cannot be imported; and the rooms' sizes, with a test file
beside each module."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

from helpers import ROOT, xla_flags

PACKAGE = pathlib.Path(ROOT) / "eqco_jax"

# The layers, in order: a module's layer is the folder it stands in.
LAYERS = ("core", "data", "program")
# The public paths at the top of the package: faces that hand on names of
# the layers and define nothing.
FACES = {"eqco_jax", "eqco_jax.losses", "eqco_jax.models", "eqco_jax.main",
         "eqco_jax.export"}

# Third-party packages each layer may import (the standard library is free).
CORE_THIRD_PARTY = {"jax", "flax", "optax", "numpy", "ml_collections"}
DATA_THIRD_PARTY = CORE_THIRD_PARTY | {"tensorflow", "tensorflow_datasets",
                                       "pandas", "absl", "fsspec"}
CORE_ONLY_TESTED = ("tensorflow", "tensorflow_datasets", "clu")


def module_names() -> dict[str, pathlib.Path]:
  names = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    names[".".join(parts)] = path
  return names


def layer(module: str) -> int | None:
  """0 core, 1 data, 2 program, from the module's folder; None for a face."""
  if module in FACES:
    return None
  parts = module.split(".")
  assert len(parts) > 1 and parts[1] in LAYERS, (
      f"{module} stands in no layer's folder: move it into "
      f"eqco_jax/{{{','.join(LAYERS)}}}/ or make it a face")
  return LAYERS.index(parts[1])


def imports_of(path: pathlib.Path, module: str) -> set[str]:
  """Absolute names of everything ``path`` imports, at any depth."""
  found = set()
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parent = package.rsplit(".", node.level - 1)[0]
        base = f"{parent}.{base}" if base else parent
      found.add(base)
      # `from eqco_jax import losses` imports the module eqco_jax.losses.
      found.update(f"{base}.{alias.name}" for alias in node.names
                   if f"{base}.{alias.name}" in module_names())
  return found


TESTS = pathlib.Path(ROOT) / "tests"


def test_every_module_has_a_test_file_that_mirrors_its_path():
  """``eqco_jax/a/b.py`` is tested in ``tests/a/test_b.py`` (a face at the
  top, ``eqco_jax/b.py``, in ``tests/test_b.py``)."""
  missing = []
  for module, path in module_names().items():
    if path.name == "__init__.py":
      continue
    relative = path.relative_to(PACKAGE)
    mirror = TESTS / relative.parent / f"test_{relative.name}"
    if not mirror.is_file():
      missing.append(f"{module}: {mirror.relative_to(ROOT)}")
  assert not missing, missing


def test_rooms_are_small():
  """No folder holds more than 9 modules directly, and no module is over
  400 lines."""
  folders = {path.parent for path in PACKAGE.rglob("*.py")}
  crowded = {str(f.relative_to(ROOT)): n for f in folders
             if (n := len(list(f.glob("*.py")))) > 9}
  assert not crowded, crowded
  long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
          if (n := len(p.read_text().splitlines())) > 400}
  assert not long, long


def test_every_module_has_a_layer_or_is_a_face():
  for module in module_names():
    layer(module)
  assert set(module_names()) >= FACES


@pytest.mark.parametrize("module", sorted(set(module_names()) - FACES))
def test_no_module_imports_a_higher_layer_or_a_foreign_package(module):
  own = layer(module)
  allowed_third_party = (CORE_THIRD_PARTY, DATA_THIRD_PARTY, None)[own]
  for name in imports_of(module_names()[module], module):
    top = name.split(".")[0]
    if top == "eqco_jax":
      assert name not in FACES or name == "eqco_jax", (
          f"{module} imports the face {name}: import the layer's module")
      if name in module_names() and name not in FACES:
        assert layer(name) <= own, f"{module} ({own}) imports {name}"
    elif top in sys.stdlib_module_names or top == "__future__":
      continue
    elif allowed_third_party is not None:
      assert top in allowed_third_party, f"{module} imports {name}"


@pytest.mark.parametrize("face", sorted(FACES))
def test_faces_only_hand_names_on(face):
  """A face holds a docstring, imports, ``__all__``/``__version__`` and the
  ``__main__`` guard that runs a program; everything else is in a layer."""
  tree = ast.parse(module_names()[face].read_text())
  for node in tree.body:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      continue
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
      continue
    if isinstance(node, ast.Assign) and [t.id for t in node.targets] in (
        ["__all__"], ["__version__"]):
      continue
    assert isinstance(node, ast.If) and ast.unparse(node.test) == (
        "__name__ == '__main__'"), f"{face}:{node.lineno} defines something"


def test_only_the_data_layer_imports_tensorflow():
  for module, path in module_names().items():
    tops = {name.split(".")[0] for name in imports_of(path, module)}
    if tops & {"tensorflow", "tensorflow_datasets"}:
      # (The program imports it once, in cli.import_tensorflow.)
      assert layer(module) == 1 or module == "eqco_jax.program.commands.cli", module


BLOCKED_RUN = """
import importlib, importlib.abc, sys

class Blocker(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in {blocked!r}:
      raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)")
    return None

sys.meta_path.insert(0, Blocker())
for name in {modules!r}:
  importlib.import_module(name)

import jax, jax.numpy as jnp
from eqco_jax.core import config as config_lib, losses, sharding
from eqco_jax.core.training import builders
q = losses.l2_normalize(jax.random.normal(jax.random.key(0), (8, 4)))
k = losses.l2_normalize(jax.random.normal(jax.random.key(1), (8, 4)))
print("loss", float(losses.in_batch_eqco(q, k, temperature=0.2, alpha=64.0)))

from benchmarks import step_throughput
report = step_throughput.benchmark(step_throughput.parse_args([
    "--config=configs/quickstart.py:tiny", "--config.batch_size=8",
    "--config.eval_batch_size=8", "--config.image_size=16", "--steps=1",
    "--warmup=1"]))
print("step", report["final_loss"], report["images_per_sec"])
assert not {blocked!r} & set(m.split(".")[0] for m in sys.modules)
"""


def test_core_and_step_benchmark_run_without_tensorflow_tfds_and_clu():
  core = sorted(m for m in module_names() if m.startswith("eqco_jax.core"))
  script = BLOCKED_RUN.format(
      blocked=set(CORE_ONLY_TESTED),
      modules=core + ["eqco_jax.losses", "eqco_jax.models",
                      "eqco_jax.data.catalog"])
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_flags(1))
  result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
  assert 0.0 < float(lines["loss"]) < 20.0
  loss, rate = map(float, lines["step"].split())
  assert 0.0 < loss < 20.0 and rate > 0


# File-system calls that would take a gs:// URL for a local path.
LOCAL_ONLY_CALLS = {"open", "os.path", "os.makedirs", "os.replace",
                    "os.listdir", "os.remove", "os.rename", "shutil"}


def test_program_files_go_through_the_path_layer():
  """Only ``storage`` touches the file system by name: every other program
  module reads and writes workdirs through it (or orbax), never ``os.path``
  or ``open``."""
  offenders = []
  for module, path in module_names().items():
    if layer(module) != 2 or module == "eqco_jax.program.files.storage":
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      name = None
      if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name = node.func.id
      elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        name = f"{node.value.id}.{node.attr}"
        if node.value.id == "shutil":
          name = "shutil"
      if name in LOCAL_ONLY_CALLS:
        offenders.append(f"{module}:{node.lineno} {name}")
  assert not offenders, offenders


def test_the_blocker_really_blocks():
  script = BLOCKED_RUN.format(blocked={"tensorflow"},
                              modules=["eqco_jax.data.pipeline"])
  result = subprocess.run([sys.executable, "-c", script], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "No module named 'tensorflow' (blocked)" in result.stderr
