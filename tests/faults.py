"""Fault injection into a checkpoint's files: where a restore reads each
array's stored bytes, and damage to them (a flipped bit, a truncation).

A checkpoint's ``state/`` is an OCDBT database of tensorstore: orbax writes
one per process (``state/ocdbt.process_0/``) and merges their indexes into
a root B-tree node in ``state/d/``, which a restore reads. Chunks of up to
1 KB are stored in that node itself; larger ones are byte ranges of the
data files under ``state/ocdbt.process_0/d/``, which also hold the
per-process index nodes, superseded by the merged one and never read again.
"""

from __future__ import annotations

import pathlib
from typing import NamedTuple

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
