"""eqco_jax.data.tfdata: functions traced as written (no AutoGraph), and
pipelines whose order does not depend on thread timing."""

import random
import time

import pytest
import tensorflow as tf

from eqco_jax.data.tfdata import as_written, deterministic


def test_as_written_skips_autographs_rewrite():
  def branch(x):
    if x > 0:  # Python control flow on a tensor: only AutoGraph makes it
      return x   # a graph condition
    return -x

  ds = tf.data.Dataset.range(3)
  assert list(ds.map(branch).as_numpy_iterator()) == [0, 1, 2]
  with pytest.raises((TypeError, tf.errors.OperatorNotAllowedInGraphError)):
    ds.map(as_written(branch))


def test_a_deterministic_pipeline_keeps_its_order_whatever_the_threads():
  def slow(x):
    time.sleep(random.random() / 200)  # a thread's own pace
    return x

  def jittered(x):
    return tf.py_function(slow, [x], tf.int64)

  ds = tf.data.Dataset.range(64).map(jittered,
                                     num_parallel_calls=tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = False
  assert list(deterministic(ds.with_options(options)).as_numpy_iterator()) == (
      list(range(64)))
