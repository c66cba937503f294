"""How the data layer uses tf.data: functions traced as written, and
deterministic pipelines.

``Dataset.map`` and ``flat_map`` run every function through AutoGraph first,
which rewrites Python control flow on tensors into graph ops. The data code
has none (its ``if``s are on Python values and dtypes), and the rewrite costs
about 4 s of every program start, so the pipelines skip it.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import tensorflow as tf

F = TypeVar("F", bound=Callable)


def as_written(fn: F) -> F:
  """``fn``, marked for tf.data to trace without AutoGraph's rewrite."""
  return tf.autograph.experimental.do_not_convert(fn)


def deterministic(ds: tf.data.Dataset) -> tf.data.Dataset:
  """``ds`` with its elements in the same order whatever the threads do."""
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)
