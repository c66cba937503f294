"""eqco_jax.program.logs: the program's lines name their process; the
libraries' chatter, and the errors they log before raising, stay out."""

import contextlib
import logging as python_logging

from absl import logging

from eqco_jax.program import logs


def _record(level: int, pathname: str, msg: str = "a line"
            ) -> python_logging.LogRecord:
  return python_logging.LogRecord("absl", level, pathname, 1, msg, None, None)


def _passes(filters, record: python_logging.LogRecord) -> bool:
  return all(f.filter(record) for f in filters)


@contextlib.contextmanager
def _filters_added(holder, install):
  """The filters ``install()`` adds to ``holder`` (a logger or handler),
  removed afterwards."""
  before = list(holder.filters)
  install()
  try:
    yield [f for f in holder.filters if f not in before]
  finally:
    holder.filters[:] = before


def test_quiet_libraries_drops_their_info_and_keeps_their_warnings():
  twice = lambda: (logs.quiet_libraries(), logs.quiet_libraries())
  with _filters_added(logging.get_absl_handler(), twice) as added:
    assert len(added) == 1  # once is enough
    orbax = "/site-packages/orbax/checkpoint/manager.py"
    assert not _passes(added, _record(python_logging.INFO, orbax))
    assert _passes(added, _record(python_logging.WARNING, orbax))
    assert _passes(added, _record(python_logging.INFO, "/eqco_jax/run.py"))
    # JAX's note on each backend it could not start (no TPU here).
    probe = "/site-packages/jax/_src/xla_bridge.py"
    assert not _passes(added, _record(python_logging.INFO, probe))
    assert _passes(added, _record(python_logging.WARNING, probe))
    # --verbosity=1: the libraries' INFO lines are back.
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.DEBUG)
    try:
      assert _passes(added, _record(python_logging.INFO, orbax))
    finally:
      logging.set_verbosity(verbosity)


def test_every_line_names_its_process():
  with _filters_added(logging.get_absl_handler(),
                      lambda: logs.tag_processes(1, 4)) as added:
    record = _record(python_logging.INFO, "/eqco_jax/train.py", "Resumed.")
    assert _passes(added, record)
    assert record.msg == "[process 1/4] Resumed."


def test_errors_a_library_raises_are_not_printed_twice():
  logger = python_logging.getLogger("asyncio")
  with _filters_added(logger, logs.drop_library_errors):
    task = "/lib/python3.11/asyncio/base_events.py"
    assert not _passes(logger.filters, _record(python_logging.ERROR, task))
    assert _passes(logger.filters, _record(python_logging.WARNING, task))
    assert _passes(logger.filters,
                   _record(python_logging.ERROR, "/eqco_jax/x.py"))


def test_the_read_only_notice_is_dropped_inside_only():
  absl_logger = python_logging.getLogger("absl")
  notice = _record(python_logging.WARNING, "/orbax/x.py",
                   "Given directory is read only=/w/checkpoints")
  with logs.without_read_only_notice():
    assert not _passes(absl_logger.filters, notice)
  assert _passes(absl_logger.filters, notice)
