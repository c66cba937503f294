"""What a pretraining run records about itself in its workdir, read back by
the programs that use the run (linear evaluation, export).

Light: imports neither jax nor TensorFlow, so ``main`` can check a
``pretrain_workdir`` in a second, before the heavy imports.
"""

from __future__ import annotations

import ml_collections

from eqco_jax import files
from eqco_jax.errors import UserError

# Config fields renamed since older runs recorded their config.json.
_RENAMED_FIELDS = {"momentum": "ema_momentum"}


def load_pretrain_config(pretrain_workdir: str | None, *,
                         flag: str = "config.pretrain_workdir"
                         ) -> ml_collections.ConfigDict:
  """The config a pretraining run saved in its workdir (``config.json``);
  ``flag`` is what the user set, for the error messages."""
  if not pretrain_workdir:
    raise UserError(f"{flag} is not set; pass --{flag.lstrip('-')}=DIR of a "
                    "pretraining run.")
  path = files.path(pretrain_workdir) / "config.json"
  recorded = files.read_json(path)
  if recorded is None:
    raise UserError(f"{path} does not exist; point {flag} at the --workdir "
                    "of a pretraining run.")
  for old, new in _RENAMED_FIELDS.items():
    if old in recorded and new not in recorded:
      recorded[new] = recorded.pop(old)
  return ml_collections.ConfigDict(recorded)
