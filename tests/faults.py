"""Fault injection: into a checkpoint's files (where a restore reads each
array's stored bytes, and damage to them: a flipped bit, a truncation); a
disk that fills up at a chosen call of the program (:func:`filling_before`,
on a small tmpfs); Python's writes under a folder that fail as on a
read-only or full disk (:class:`FailingDisk`).

A checkpoint's ``state/`` is an OCDBT database of tensorstore: orbax writes
one per process (``state/ocdbt.process_0/``) and merges their indexes into
a root B-tree node in ``state/d/``, which a restore reads. Chunks of up to
1 KB are stored in that node itself; larger ones are byte ranges of the
data files under ``state/ocdbt.process_0/d/``, which also hold the
per-process index nodes, superseded by the merged one and never read again.
"""

from __future__ import annotations

import builtins
import errno
import functools
import importlib
import os
import pathlib
import time
from typing import Any, Callable, NamedTuple

import tensorstore as ts

PROCESS_DATA = pathlib.Path("state", "ocdbt.process_0", "d")


class Value(NamedTuple):
  """A stored chunk a restore reads: its key (``params.backbone.conv1.
  kernel/0.0.0.0``), data file, offset and length there."""
  key: str
  file: pathlib.Path
  offset: int
  length: int


def data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  """The data files of process 0 in checkpoint folder ``step_dir``."""
  return sorted(p for p in (step_dir / PROCESS_DATA).iterdir() if p.is_file())


def read_values(step_dir: pathlib.Path) -> list[Value]:
  """The chunks of ``step_dir``'s state that a restore reads from data
  files (larger than 1 KB), from its merged index (tensorstore's
  ``ocdbt.dump``)."""
  store = ts.KvStore.open(f"file://{step_dir / 'state'}/").result()
  root = ts.ocdbt.dump(store).result()["versions"][-1]
  assert root["root_height"] == 0, "an index of more than one node"
  node = ts.ocdbt.dump(store, root["root"]["location"]).result()
  values = []
  for entry in node["entries"]:
    if "indirect_value" in entry:
      # value:<database>:d/<file>:<offset>:<length>
      _, database, name, offset, length = entry["indirect_value"].split(":")
      values.append(Value(entry["key"].decode(),
                          step_dir / "state" / database / name, int(offset),
                          int(length)))
  return values


def flip_bit(path: pathlib.Path, offset: int, bit: int = 0) -> None:
  """Flips bit ``bit`` of byte ``offset`` of ``path`` in place."""
  data = bytearray(path.read_bytes())
  data[offset] ^= 1 << bit
  path.write_bytes(bytes(data))


def flip_bit_in(value: Value) -> None:
  """Flips the low bit of the middle byte of a stored chunk."""
  flip_bit(value.file, value.offset + value.length // 2)


def flip_bit_in_array(step_dir: pathlib.Path, prefix: str) -> Value:
  """Flips a bit in the first stored chunk (larger than 1 KB) of an array
  whose key starts with ``prefix`` (``params.backbone.``); returns it."""
  value = next(v for v in read_values(step_dir) if v.key.startswith(prefix))
  flip_bit_in(value)
  return value


def truncate(path: pathlib.Path, size: int) -> None:
  """Keeps the first ``size`` bytes of ``path``."""
  path.write_bytes(path.read_bytes()[:size])


# ------------------------------------------------ a disk that fills up.


def fill(disk: pathlib.Path) -> None:
  """Fills the file system of the folder ``disk`` (a small tmpfs): a file
  ``disk/filler`` grows until not one byte more fits."""
  with open(disk / "filler", "ab", buffering=0) as filler:
    for block in (1 << 16, 1):
      try:
        while True:
          filler.write(b"\0" * block)
      except OSError as error:
        if error.errno != errno.ENOSPC:
          raise


def filling_before(target: str, disk: pathlib.Path, call: int = 1,
                   note: pathlib.Path | None = None,
                   first: Callable[..., Any] | None = None) -> None:
  """Makes the ``call``-th call of ``target`` (``module:name`` or
  ``module:Class.name``) fill ``disk`` (:func:`fill`) before it runs,
  after ``first(*its arguments)`` if given: the disk is full from that
  moment of the program on, whose time (``time.time()``) is written to
  ``note``, off that disk."""
  module, name = target.split(":")
  owner = importlib.import_module(module)
  *classes, name = name.split(".")
  for cls in classes:
    owner = getattr(owner, cls)
  original, calls = getattr(owner, name), []

  @functools.wraps(original)
  def filling(*args, **kwargs):
    calls.append(1)
    if len(calls) == call:
      if first is not None:
        first(*args, **kwargs)
      fill(disk)
      if note is not None:
        note.write_text(repr(time.time()))
    return original(*args, **kwargs)

  setattr(owner, name, filling)


# ------------------------------------- writes that fail, in this process.


class _Guarded:
  """A file opened to write under a :class:`FailingDisk`'s root: its writes
  fail once the disk does."""

  def __init__(self, file, disk: FailingDisk, name: str):
    self._file, self._disk, self._name = file, disk, name

  def write(self, data):
    self._disk.check(self._name)
    return self._file.write(data)

  def flush(self):
    self._disk.check(self._name)
    return self._file.flush()

  def __getattr__(self, name: str):
    return getattr(self._file, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._file.close()


class FailingDisk:
  """Python's writes under ``root`` fail with OSError ``error_number``
  (``errno.EROFS``: a disk remounted read-only, ``errno.ENOSPC``: full)
  from the moment ``failing`` is set: opening a file to write, writing to
  one opened before, renaming, making a folder (``os.makedirs`` too). (Tensorstore's writes,
  a checkpoint's arrays, are not Python's: a real full disk is in
  test_checkpointing.py and test_faults.py.) :meth:`install` patches
  them with ``monkeypatch``."""

  def __init__(self, root: pathlib.Path, error_number: int,
               failing: bool = True):
    self.root, self.error_number, self.failing = (
        str(root), error_number, failing)

  def under(self, path) -> bool:
    return os.path.abspath(os.fspath(path)).startswith(self.root)

  def check(self, path) -> None:
    if self.failing and self.under(path):
      raise OSError(self.error_number, os.strerror(self.error_number),
                    os.fspath(path))

  def install(self, monkeypatch) -> FailingDisk:
    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
      if isinstance(file, int) or not set(mode) & set("wax+"):
        return real_open(file, mode, *args, **kwargs)
      self.check(file)
      opened = real_open(file, mode, *args, **kwargs)
      return _Guarded(opened, self, file) if self.under(file) else opened

    def checked(real, *paths):
      def call(*args, **kwargs):
        for path in args[:len(paths)]:
          self.check(path)
        return real(*args, **kwargs)
      return call

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "replace", checked(os.replace, "src", "dst"))
    monkeypatch.setattr(os, "rename", checked(os.rename, "src", "dst"))
    monkeypatch.setattr(os, "mkdir", checked(os.mkdir, "path"))
    return self
