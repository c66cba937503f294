"""``python -m eqco_jax.main --config=FILE.py[:VARIANT] --workdir=DIR``:
pretraining and linear evaluation (the program is
:mod:`eqco_jax.program.main`)."""

from absl import app

from eqco_jax.program.main import main

if __name__ == "__main__":
  app.run(main)
