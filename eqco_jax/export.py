"""python -m eqco_jax.export --workdir=RUN --out=FILE [--step=N]
    [--encoder=online|momentum] [--format=torchvision|detectron2]

Writes the backbone of a pretraining run's checkpoint (the newest intact
one, or --step) for torchvision or timm (FILE.safetensors, or FILE.pth with
PyTorch installed) or detectron2 (FILE.pkl; the config lines that go with
it are printed). The run's config comes from its workdir: no --config.
"""

from eqco_jax.program.commands import cli
from eqco_jax.program.commands.export import define_flags, export, main

__all__ = ["export"]

if __name__ == "__main__":
  cli.run(main, define_flags)
