"""Records whose image cannot be decoded (a truncated or corrupt JPEG).

A run never dies on one: each example is decoded inside a one-element
dataset whose errors are dropped (``tf.data.Dataset.ignore_errors``), which
gives the decoded result and a ``readable`` flag instead of an error. The
pipelines then leave the record out without moving any other example:

* pretraining: the record's place in its batch is taken by the next readable
  example of the same device's rows of the batch (its two crops, with the
  record's own colour draws), so every step still has a full batch and the
  batch of step s stays a function of (seed, s), whichever processes the
  devices belong to; the record's id comes out with the batch, to be counted
  and logged;
* evaluation: the record becomes padding (``mask`` False).

A JPEG cut short (an interrupted copy) is unreadable whichever crop of it a
view asks for: :func:`whole_jpeg` refuses it before TensorFlow's decoder
sees it, which would decode a crop above the cut (half an image) and log
``Premature end of JPEG data`` for one below it.
"""

from __future__ import annotations

from typing import Any, Callable

import tensorflow as tf

from eqco_jax.data.tfdata import as_written


def decode_or_flag(fn: Callable[[Any], Any], example: Any
                   ) -> tuple[Any, tf.Tensor]:
  """``(fn(example), True)``, or ``(zeros, False)`` where ``fn`` fails.

  For use inside ``Dataset.map``. ``fn``'s outputs must have fully defined
  shapes (the zeros take them).
  """
  attempt = tf.data.Dataset.from_tensors(example).map(as_written(fn))
  spec = attempt.element_spec
  zeros = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), spec)
  ok = attempt.map(
      as_written(lambda out: (out, tf.constant(True)))
  ).ignore_errors()
  failed = tf.data.Dataset.from_tensors((zeros, tf.constant(False)))
  return ok.concatenate(failed).take(1).get_single_element()


# JPEG markers: start of scan, end of image.
_SCAN, _END = b"\xff\xda", b"\xff\xd9"


def whole_jpeg(data: tf.Tensor) -> tf.Tensor:
  """``data`` (a JPEG's bytes, a string scalar), checked to hold an end of
  image marker after its first scan: raises InvalidArgumentError (in
  ``decode_or_flag``: unreadable) where it does not.

  Only files TensorFlow's decoder refuses whole are refused (it refuses one
  that lacks just its last two bytes); bytes after the marker (a phone's
  appended video) are allowed.
  """
  after_scan = tf.strings.split(data, sep=_SCAN, maxsplit=1)
  ended = tf.strings.split(after_scan[-1], sep=_END, maxsplit=1)
  whole = tf.logical_and(tf.size(after_scan) == 2, tf.size(ended) == 2)
  check = tf.debugging.Assert(whole, ["a JPEG cut short (no end marker)"])
  with tf.control_dependencies([check]):
    return tf.identity(data)


def fill_rows(rows: dict[str, tf.Tensor], readable: tf.Tensor,
              group_size: int | None = None) -> dict[str, tf.Tensor]:
  """Each unreadable row of ``rows`` replaced by the next readable row of its
  group (cyclically); a group without any readable row is left as it is.

  ``rows``: tensors ``[B, ...]``; ``readable``: bool ``[B]``; groups are
  ``group_size`` consecutive rows (default: all B; the last may be short).
  """
  size = tf.shape(readable)[0]
  group = size if group_size is None else tf.constant(group_size, tf.int32)
  index = tf.range(size, dtype=tf.int32)
  start = index // group * group
  end = tf.minimum(start + group, size)
  good = tf.cast(tf.reshape(tf.where(readable), [-1]), tf.int32)
  after_good = tf.concat([good, [size]], 0)  # a sentinel past every group
  following = tf.gather(after_good, tf.searchsorted(good, index))
  first = tf.gather(after_good, tf.searchsorted(good, start))
  source = tf.where(following < end, following,
                    tf.where(first < end, first, index))
  return {name: tf.gather(value, source) for name, value in rows.items()}
