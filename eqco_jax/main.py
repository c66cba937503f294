"""``python -m eqco_jax.main --config=FILE.py[:VARIANT] --workdir=DIR``:
pretraining and linear evaluation (the program is
:mod:`eqco_jax.program.commands.main`)."""

from eqco_jax.program.commands import cli
from eqco_jax.program.commands.main import define_flags, main

if __name__ == "__main__":
  cli.run(main, define_flags)
