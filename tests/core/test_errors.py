"""eqco_jax.core.errors: the chain of causes, and one line for a message."""

from eqco_jax.core.errors import UserError, exception_chain, one_line


def test_the_chain_runs_from_the_error_to_its_first_cause():
  try:
    try:
      try:
        raise OSError("disk full")
      except OSError as error:
        raise RuntimeError("write failed") from error
    except RuntimeError:
      raise UserError("cannot save")  # while handling: the context
  except UserError as error:
    chain = list(exception_chain(error))
  assert [type(e) for e in chain] == [UserError, RuntimeError, OSError]
  assert list(exception_chain(None)) == []


def test_one_line_is_the_type_and_the_first_line():
  assert one_line(ValueError("bad value\nthe rest of it")) == (
      "ValueError: bad value")
  assert one_line(KeyError()) == "KeyError"
  assert one_line(OSError("  \n  spaced")) == "OSError: spaced"
