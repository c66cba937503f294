"""Compiling the train step once per process, through JAX's persistent
compilation cache, so that a restart does not compile it again.

The cache is on for every run: ``config.compilation_cache_dir`` names it
(local or ``gs://``); None means ``$JAX_COMPILATION_CACHE_DIR`` or
``~/.cache/eqco_jax/jax_cache``; ``''`` turns it off. JAX keeps programs that
took at least ``jax_persistent_cache_min_compile_time_secs`` (1 s unless
set) to compile, which the train step of any real model does.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
from absl import logging

from eqco_jax.program.files import storage

DEFAULT_CACHE = "~/.cache/eqco_jax/jax_cache"
_CACHE_HITS = "/jax/compilation_cache/cache_hits"
_events: dict[str, int] = {}


def _count(event: str, **kwargs) -> None:
  del kwargs
  _events[event] = _events.get(event, 0) + 1


jax.monitoring.register_event_listener(_count)


def use_cache(directory: str | None) -> str | None:
  """Turns JAX's persistent compilation cache on in ``directory`` (see the
  module's docstring); returns the directory, or None when it is off. Call
  it before anything compiles."""
  if directory == "":
    return None
  directory = (directory or os.environ.get("JAX_COMPILATION_CACHE_DIR")
               or DEFAULT_CACHE)
  directory = os.fspath(storage.path(directory))
  jax.config.update("jax_compilation_cache_dir", directory)
  return directory


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
