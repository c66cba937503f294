"""The one exception type for mistakes a user can fix (config, data, workdir).

``main`` prints its message as one line and exits non-zero, without a
traceback; anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
  """A bad config value, missing data or a mismatched checkpoint."""
