"""eqco_jax.export, the public path of the export (its command runs in
tests/program/commands/test_export.py)."""

from eqco_jax import export
from eqco_jax.program.commands import export as export_command


def test_the_public_export_is_the_commands():
  assert export.__all__ == ["export"]
  assert export.export is export_command.export
  assert (export.main, export.define_flags) == (export_command.main,
                                                export_command.define_flags)
