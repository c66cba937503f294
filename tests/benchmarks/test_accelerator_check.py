"""The device check's own failure: no ml_collections and no wheel for it.

The benchmark commands themselves run as the README writes them, in
test_documented_commands.py.
"""

import os
import subprocess
import sys

from helpers import ROOT


def test_accelerator_check_asks_for_the_ml_collections_wheel(tmp_path):
  # An interpreter without ml_collections: a venv with nothing installed.
  subprocess.run([sys.executable, "-m", "venv", "--without-pip",
                  str(tmp_path / "bare")], check=True)
  env = dict(os.environ, PYTHON=str(tmp_path / "bare" / "bin" / "python"))
  result = subprocess.run(
      ["bash", os.path.join(ROOT, "benchmarks", "accelerator_check.sh"),
       f"--wheels={tmp_path}"], cwd=ROOT, env=env, capture_output=True,
      text=True, timeout=60)
  assert result.returncode == 1
  assert result.stderr.strip() == (
      f"ml_collections is not installed and no ml_collections-*.whl is in "
      f"{tmp_path}/: run 'pip download --no-deps ml-collections==1.1.0 -d "
      f"{tmp_path}/' where a registry is reachable, then copy it here.")
