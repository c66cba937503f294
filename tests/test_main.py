"""``python -m eqco_jax.main``, the program's public path, as a user starts
it (its runs: tests/scenarios/, its command-line mistakes:
tests/program/commands/test_main.py)."""

from eqco_jax import main
from eqco_jax.program.commands import main as main_command


def test_the_public_program_is_the_commands():
  assert (main.main, main.define_flags) == (main_command.main,
                                            main_command.define_flags)
