"""eqco_jax.program.cli: every command reads absl flags, states a mistake
on its command line in one line, and imports TensorFlow without the
libraries its Keras would pull in."""

import subprocess
import sys

import pytest
from absl import flags

from helpers import ROOT, run_python
from eqco_jax.program import cli


def _define(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_integer("steps", 3, "Steps.", flag_values=flag_values)
  flags.DEFINE_list("ks", ["4"], "Ks.", flag_values=flag_values)


def test_a_command_line_parsed_into_flags_of_its_own():
  parsed = cli.parse(_define, ["--steps=7", "--ks=16,64"])
  assert (parsed.steps, parsed.ks) == (7, ["16", "64"])
  assert "steps" not in flags.FLAGS  # the global flags are untouched
  with pytest.raises(flags.Error):
    cli.parse(_define, ["--stepz=7"])


def test_tensorflow_imports_lean():
  run_python("import sys",
             "from eqco_jax.program import cli",
             "tf = cli.import_tensorflow()",
             "assert sum(tf.data.Dataset.range(4).as_numpy_iterator()) == 6",
             "from eqco_jax.program import train  # clu, TensorBoard, Keras",
             "assert 'keras' in sys.modules",
             # None of them imported, and nothing left that would stop them
             # importing later.
             "for name in ('sklearn', 'pandas', 'matplotlib'):",
             "  assert name not in sys.modules, name")


def test_every_command_states_a_flag_mistake_in_one_line():
  """(Those of ``python -m eqco_jax.main`` are in test_main.py.)"""
  result = subprocess.run([sys.executable, "-m", "eqco_jax.export"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert result.returncode == 1
  assert result.stderr.strip() == (
      "error: --workdir and --out are missing; add them to the command "
      "(--helpfull says what each flag takes).")
