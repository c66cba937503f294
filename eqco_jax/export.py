"""``python -m eqco_jax.export --workdir=RUN --out=FILE``: a run's backbone
for torchvision, timm or detectron2 (the program is
:mod:`eqco_jax.program.commands.export`)."""

from eqco_jax.program.commands import cli
from eqco_jax.program.commands.export import define_flags, export, main

__all__ = ["export"]

if __name__ == "__main__":
  cli.run(main, define_flags)
