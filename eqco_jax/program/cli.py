"""How every command of eqco-jax reads its command line: absl flags.

A command defines its flags with a ``define_flags(flag_values)`` function
and runs with :func:`run`; another command (or a test) calls it from Python
with the flags of :func:`parse`, parsed from a list as a shell would pass
them, without touching the global flags.
"""

from __future__ import annotations

from typing import Callable, Sequence

from absl import app
from absl import flags

DefineFlags = Callable[[flags.FlagValues], None]


def run(main: Callable[[flags.FlagValues], None]) -> None:
  """Runs ``main(flags.FLAGS)`` once absl has parsed the command line (the
  flags defined beforehand); positional arguments are refused."""

  def absl_main(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    main(flags.FLAGS)

  app.run(absl_main)


def parse(define_flags: DefineFlags, argv: Sequence[str]
          ) -> flags.FlagValues:
  """``argv`` (flags as a shell passes them) parsed into flags of their own,
  defined by ``define_flags``."""
  parsed = flags.FlagValues()
  define_flags(parsed)
  parsed(["command", *argv])
  return parsed
