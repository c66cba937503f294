"""The core alone, installed into a fresh environment: its declared
dependencies suffice to import it and run tests/check_core.py (the losses,
SiMo steps, the sharded kNN), and they bring no TensorFlow; its
lower bounds are the oldest versions it was checked with.

No network: the fresh virtual environment gets the already installed
distributions of the core's dependency closure (read from eqco-jax's own
setup.cfg) by symbolic links, and eqco-jax itself by ``pip install --no-deps
--no-index``; ``pip check`` then proves nothing it declares is missing.
"""

import configparser
import importlib.metadata
import os
import pathlib
import re
import shutil
import subprocess
import sys

from packaging.requirements import Requirement

from helpers import ROOT

def _key(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def core_requirements() -> list[str]:
  """``install_requires`` of setup.cfg: the core's dependencies."""
  parser = configparser.ConfigParser()
  parser.read(os.path.join(ROOT, "setup.cfg"))
  lines = parser["options"]["install_requires"].splitlines()
  return [line.split("#")[0].strip() for line in lines
          if line.split("#")[0].strip()]


def closure(requirements: list[str]
            ) -> dict[str, importlib.metadata.Distribution]:
  """The installed distributions of ``requirements`` and of theirs."""
  found, stack = {}, list(requirements)
  while stack:
    requirement = Requirement(stack.pop())
    if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
      continue
    if _key(requirement.name) in found:
      continue
    dist = importlib.metadata.distribution(requirement.name)
    found[_key(requirement.name)] = dist
    stack.extend(dist.requires or [])
  return found


def link_distribution(dist, site: pathlib.Path) -> None:
  """Links each top-level file and folder of ``dist`` into ``site``."""
  for name in {pathlib.Path(f).parts[0] for f in dist.files or []}:
    if name in ("..", "__pycache__") or (site / name).exists():
      continue
    (site / name).symlink_to(pathlib.Path(dist.locate_file(name)).resolve())


def test_core_installs_alone_and_runs_a_simo_step(tmp_path):
  core = closure(core_requirements())
  assert {"jax", "flax", "optax", "numpy", "ml-collections"} <= set(core)
  assert not {"tensorflow", "tensorflow-cpu", "tensorflow-datasets", "clu",
              "tensorboard"} & set(core), sorted(core)

  env = tmp_path / "env"
  subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
  python = env / "bin" / "python"
  site = pathlib.Path(subprocess.run(
      [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
      check=True, capture_output=True, text=True).stdout.strip())
  # Building eqco-jax's wheel needs `wheel` beside the venv's setuptools.
  for dist in {**core, **closure(["wheel"])}.values():
    link_distribution(dist, site)

  source = tmp_path / "src"
  shutil.copytree(os.path.join(ROOT, "eqco_jax"), source / "eqco_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("setup.cfg", "pyproject.toml", "README.md"):
    shutil.copy(os.path.join(ROOT, name), source / name)
  pip = [python, "-m", "pip", "--disable-pip-version-check", "--no-cache-dir"]
  subprocess.run([*pip, "install", "-q", "--no-deps", "--no-index",
                  "--no-build-isolation", str(source)], check=True,
                 capture_output=True)
  check = subprocess.run([*pip, "check"], capture_output=True, text=True)
  assert check.returncode == 0, check.stdout + check.stderr

  clean = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
  clean.update(JAX_PLATFORMS="cpu", XLA_FLAGS="")
  no_tf = subprocess.run([python, "-c", "import tensorflow"], env=clean,
                         cwd=tmp_path, capture_output=True, text=True)
  assert "No module named 'tensorflow'" in no_tf.stderr
  result = subprocess.run(
      [python, os.path.join(ROOT, "tests", "check_core.py")], env=clean,
      cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = dict(line.rsplit(" ", 1) for line in result.stdout.splitlines())
  assert 0 < float(lines["simo loss"]) < 20
  assert lines["OK"] == importlib.metadata.version("jax")
  assert "site-packages" in subprocess.run(
      [python, "-c", "import eqco_jax; print(eqco_jax.__file__)"], env=clean,
      cwd=tmp_path, capture_output=True, text=True).stdout


def test_the_cores_lower_bounds_are_the_oldest_versions_checked():
  oldest = {}
  with open(os.path.join(ROOT, "constraints-oldest.txt")) as f:
    for line in f:
      if line.split("#")[0].strip():
        requirement = Requirement(line.strip())
        oldest[_key(requirement.name)] = str(requirement.specifier)
  bounds = {_key(Requirement(r).name): str(Requirement(r).specifier)
            for r in core_requirements()}
  assert {name: spec.replace("==", ">=") for name, spec in oldest.items()
          if name != "jaxlib"} == bounds
