"""``python -m eqco_jax.main --config=FILE.py[:VARIANT] --workdir=DIR``:
pretraining and linear evaluation (the program is
:mod:`eqco_jax.program.main`)."""

from eqco_jax.program import cli
from eqco_jax.program.main import main

if __name__ == "__main__":
  cli.run(main)
