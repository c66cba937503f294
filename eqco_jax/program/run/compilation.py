"""Compiling the train step once per process, through JAX's persistent
compilation cache, so that a restart does not compile it again.

The cache is on for every run, in the first of: ``config.compilation_cache_dir``
(local or ``gs://``; ``''`` turns it off); ``$JAX_COMPILATION_CACHE_DIR``;
``jax_cache`` beside the workdir (``WORKDIR/../jax_cache``) when the workdir
is on object storage or the run has several processes; else this host's
``~/.cache/eqco_jax/jax_cache``. JAX writes entries from process 0 only and
every process reads them, so a multi-process run needs a folder that every
host reaches: the workdir's, which they all write already. (On the CPU
backend JAX's key differs between processes, whatever the folder: there,
processes other than 0 compile at every start.) JAX keeps programs that
took at least ``jax_persistent_cache_min_compile_time_secs`` (1 s unless
set) to compile, which the train step of any real model does.

The folder is written once at start, within ``REACH_TIMEOUT_SECS``: one
that cannot be written stops the run with one sentence, where JAX would
stall the first compile for a minute or more and then warn.
"""

from __future__ import annotations

import os
import posixpath
import time
from typing import Any, Callable

import jax
from absl import logging

from eqco_jax.program.files import storage

DEFAULT_CACHE = "~/.cache/eqco_jax/jax_cache"
# The folder beside the workdir that every process of a run reaches.
SHARED_CACHE = "jax_cache"
# How long the cache folder may take to answer at start. Shorter than the
# workdir's (files.workdir.REACH_TIMEOUT_SECS), which was checked just
# before (and warmed the client of a folder in the same bucket), so that a
# folder that does not answer is said within 20 s of the launch.
REACH_TIMEOUT_SECS = 10.0
_CACHE_HITS = "/jax/compilation_cache/cache_hits"
_events: dict[str, int] = {}


def _count(event: str, **kwargs) -> None:
  del kwargs
  _events[event] = _events.get(event, 0) + 1


jax.monitoring.register_event_listener(_count)


def cache_location(configured: str | None, workdir: str, *,
                   multi_process: bool) -> str | None:
  """The cache folder of a run in ``workdir`` (see the module's docstring);
  ``configured`` is ``config.compilation_cache_dir``. None: no cache."""
  if configured is not None:
    return configured or None
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  if not (multi_process or storage.is_url(workdir)):
    return DEFAULT_CACHE
  root = os.fspath(storage.path(workdir)).rstrip("/")
  parent = posixpath.dirname(root)
  if parent == "/" or parent.endswith(":"):  # /DIR, gs://BUCKET: none above
    parent = root
  return f"{parent}/{SHARED_CACHE}"


def use_cache(configured: str | None, workdir: str, *,
              multi_process: bool) -> str | None:
  """Turns JAX's persistent compilation cache on in :func:`cache_location`
  once it has been written to; returns the folder, or None when the cache
  is off. Call it before anything compiles.

  Raises:
    UserError: the folder cannot be written, or does not answer within
      ``REACH_TIMEOUT_SECS``.
  """
  location = cache_location(configured, workdir, multi_process=multi_process)
  if location is None:
    return None
  location = os.fspath(storage.path(location))
  storage.check_writable(
      location, REACH_TIMEOUT_SECS, what="the compilation cache",
      remedy="set --config.compilation_cache_dir to a folder that every "
      "process of the run can write, or turn the cache off with "
      "--config.compilation_cache_dir=''")
  jax.config.update("jax_compilation_cache_dir", location)
  return location


def compile_step(step_fn: Callable[..., Any], *args: Any
                 ) -> tuple[Any, float, bool]:
  """``(compiled step, seconds, whether it came from the persistent
  cache)``: ``step_fn`` (a jitted function) compiled for ``args``."""
  hits, start = _events.get(_CACHE_HITS, 0), time.perf_counter()
  compiled = step_fn.lower(*args).compile()
  seconds = time.perf_counter() - start
  from_cache = _events.get(_CACHE_HITS, 0) > hits
  logging.info("Compiled the train step in %.1f s%s.", seconds,
               " (a hit of the persistent compilation cache)" if from_cache
               else "")
  return compiled, seconds, from_cache
