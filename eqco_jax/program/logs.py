"""What the program's log says, and what it leaves to the libraries: every
filter the commands install, in one place.

The program's own lines carry the process that wrote them
(:func:`tag_processes`); the libraries' chatter stays below them: orbax's,
TensorStore's and etils' INFO lines of every save and restore, JAX's notes
on the accelerators it looked for and did not find (``Unable to initialize
backend 'tpu'``): all shown with ``--verbosity=1``; the errors orbax and
asyncio log on their way to raising them (the program says them in one
sentence), orbax's notice that a read-only manager is read-only, and gcsfs's
traceback for every request it gives up on.
"""

from __future__ import annotations

import contextlib
import logging as python_logging
from typing import Iterator

from absl import logging

# Where the libraries whose lines are filtered live (a record's pathname).
_CHATTY_LIBRARIES = ("/orbax/", "/tensorstore/", "/etils/",
                     "/jax/_src/xla_bridge.py")
_RAISING_LIBRARIES = ("/orbax/", "/tensorstore/", "/asyncio/")


class _ProcessTag(python_logging.Filter):
  """Prefixes every log line with the process that wrote it."""

  def __init__(self, index: int, count: int):
    super().__init__()
    self.prefix = f"[process {index}/{count}] "

  def filter(self, record: python_logging.LogRecord) -> bool:
    record.msg = self.prefix + str(record.msg)
    return True


class _QuietLibraries(python_logging.Filter):
  """Drops the INFO chatter of orbax and its storage layers (every save and
  restore), and JAX's on the backends it tried, unless ``--verbosity`` asks
  for more than INFO."""

  def filter(self, record: python_logging.LogRecord) -> bool:
    return (record.levelno > python_logging.INFO
            or logging.get_verbosity() > logging.INFO
            or not any(part in record.pathname
                       for part in _CHATTY_LIBRARIES))


class _LibraryErrors(python_logging.Filter):
  """Drops the errors (and their tracebacks) that orbax, its storage and
  asyncio log on their way to raising them: they reach the run, which says
  them in one sentence. Their warnings stay."""

  def filter(self, record: python_logging.LogRecord) -> bool:
    return record.levelno != python_logging.ERROR or not any(
        part in record.pathname for part in _RAISING_LIBRARIES)


class _WithoutReadOnlyNotice(python_logging.Filter):
  """Drops orbax's warning that a read-only manager is read-only: reading a
  run's checkpoints read-only is what the program asks for."""

  def filter(self, record: python_logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Given directory is read only")


def _add_once(logger: python_logging.Logger | python_logging.Handler,
              kind: type[python_logging.Filter], *args) -> None:
  if not any(isinstance(f, kind) for f in logger.filters):
    logger.addFilter(kind(*args))


def quiet_libraries() -> None:
  """The libraries' INFO chatter off the absl handler (back with
  ``--verbosity=1``), and gcsfs quiet (its failures reach the user as the
  program's own sentences)."""
  _add_once(logging.get_absl_handler(), _QuietLibraries)
  python_logging.getLogger("gcsfs").setLevel(python_logging.CRITICAL)


def tag_processes(index: int, count: int) -> None:
  """Every line from here on names its process, ``[process I/N]``."""
  _add_once(logging.get_absl_handler(), _ProcessTag, index, count)


def drop_library_errors() -> None:
  """The errors orbax and asyncio log before raising them are not printed
  (the program says them in one sentence)."""
  for name in ("absl", "asyncio"):
    _add_once(python_logging.getLogger(name), _LibraryErrors)


@contextlib.contextmanager
def without_read_only_notice() -> Iterator[None]:
  """Inside, orbax does not warn that a read-only manager is read-only."""
  absl_logger = python_logging.getLogger("absl")
  quiet = _WithoutReadOnlyNotice()
  absl_logger.addFilter(quiet)
  try:
    yield
  finally:
    absl_logger.removeFilter(quiet)
