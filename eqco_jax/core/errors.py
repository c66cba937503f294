"""The one exception type for mistakes a user can fix (config, data, workdir).

``main`` prints its message as one line and exits non-zero, without a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Iterator


class UserError(ValueError):
  """A bad config value, missing data or a mismatched checkpoint."""


def exception_chain(error: BaseException | None) -> Iterator[BaseException]:
  """``error``, then what it was raised from or while handling, and so on
  (libraries wrap the error that says what happened)."""
  while error is not None:
    yield error
    error = error.__cause__ or error.__context__


def one_line(error: BaseException) -> str:
  """``Type: first line of its message`` (``Type`` alone if it has none),
  for a one-sentence message about ``error``."""
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
