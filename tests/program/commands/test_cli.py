"""eqco_jax.program.commands.cli: every command reads absl flags, states a
mistake on its command line in one line (an unknown config field with its
nearest name), and imports TensorFlow without the libraries its Keras would
pull in."""

import subprocess
import sys

import pytest
from absl import flags

from helpers import ROOT, run_python
from eqco_jax.core import config as config_lib
from eqco_jax.core.errors import UserError
from eqco_jax.program.commands import cli


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
             "from eqco_jax.program.commands import cli",
             "tf = cli.import_tensorflow()",
             "assert sum(tf.data.Dataset.range(4).as_numpy_iterator()) == 6",
             "from eqco_jax.program.run import train  # clu, TensorBoard, Keras",
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


# Each command's own flags, which --help lists.
HELP_FLAGS = {"eqco_jax.main": ("--config", "--workdir", "--[no]print_config",
                                "--coordinator_address", "--num_processes",
                                "--process_id"),
              "eqco_jax.export": ("--workdir", "--out", "--step", "--encoder",
                                  "--format")}


@pytest.mark.parametrize("command", sorted(HELP_FLAGS))
def test_help_is_plain_text_with_the_commands_flags(command):
  result = subprocess.run([sys.executable, "-m", command, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
  assert (result.returncode, result.stderr) == (0, "")
  assert result.stdout.startswith(f"python -m {command} --")
  listed = [line.split(":")[0].strip() for line in
            result.stdout.split("\nflags:\n")[1].splitlines()
            if line.startswith("  --")]
  assert sorted(HELP_FLAGS[command]) == sorted(
      name for name in listed if name != "--cpu_collectives")
  assert "``" not in result.stdout and ":mod:" not in result.stdout
  assert ":func:" not in result.stdout
  if command == "eqco_jax.main":  # how to see and set config fields
    assert "--config.FIELD=VALUE" in result.stdout
    assert "--print_config prints" in result.stdout


def test_help_text_strips_markup_and_lists_flags_of_their_own():
  text = cli.help_text("Runs :func:`main` on ``--steps`` (:mod:`x.y`).",
                       _define)
  assert text.splitlines()[0] == "Runs main on --steps (x.y)."
  assert "  --steps: Steps." in text and "  --ks: Ks." in text
  assert "--verbosity" not in text  # absl's own flags: --helpfull
  assert cli.asks_for_help(["cmd", "--steps=3", "-?"])
  assert cli.asks_for_help(["cmd", "-h"])
  assert not cli.asks_for_help(["cmd", "--", "--help"])


@pytest.mark.parametrize("path, message", [
    ("lerning_rate", "config has no field lerning_rate; did you mean "
     "base_learning_rate?"),
    ("temprature", "config has no field temprature; did you mean "
     "temperature?"),
    ("augment.colour", "config has no field augment.colour; did you mean "
     "augment.color_jitter_prob?"),
    ("linear_eval.epoch", "config has no field linear_eval.epoch; did you "
     "mean linear_eval.epochs?"),
    ("augmnt.hue", "config has no field augmnt; did you mean augment?"),
    ("xyz", "config has no field xyz; check its name in the config file."),
    ("batch_size.x", "config has no field batch_size.x; batch_size is a "
     "value, not a group of fields."),
    ("crop_scale[0]", "config has no field crop_scale; check its name in "
     "the config file."),
    ("augment.crop_scale[0]", None), ("augment.hue", None), ("alpha", None)])
def test_an_unknown_field_is_refused_with_the_nearest_name(path, message):
  config = config_lib.default_config()
  if message is None:
    cli.check_field(config, path)
  else:
    with pytest.raises(UserError) as error:
      cli.check_field(config, path)
    assert str(error.value) == message
