"""How every command of eqco-jax starts: its command line read by absl
flags, and TensorFlow imported without what it does not need.

A command defines its flags with a ``define_flags(flag_values)`` function
and runs with :func:`run`; another command (or a test) calls it from Python
with the flags of :func:`parse`, parsed from a list as a shell would pass
them, without touching the global flags.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

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


# What TensorFlow's Keras imports, when installed, for integrations the
# programs never use: about 2.5 s of every start with both installed.
_NOT_FOR_TENSORFLOW = ("sklearn", "pandas")


def import_tensorflow() -> Any:
  """``tensorflow``, imported while scikit-learn and pandas look absent to
  it (Keras guards those imports); both import normally afterwards."""
  hidden = [name for name in _NOT_FOR_TENSORFLOW if name not in sys.modules]
  for name in hidden:
    sys.modules[name] = None  # an ImportError for whoever imports it now
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top
  finally:
    for name in hidden:
      if sys.modules.get(name, "") is None:
        del sys.modules[name]
  return tensorflow
