"""Where files live, local disk or object storage: every file a run, the
linear evaluation, the export or the K sweep reads or writes goes through
here (what a workdir holds is :mod:`eqco_jax.program.workdir`).

Paths are ``etils.epath`` paths, so a workdir may be local or on object
storage (``gs://BUCKET/...``) and a URL is never handed to ``os.path``.
This module makes epath use fsspec (gcsfs) rather than TensorFlow's
filesystem for URLs, the same layer orbax uses and the one the tests run
against a local GCS emulator. JSON files are written so that no reader sees half of
one: through a temporary file and a rename on a local disk; as one object
upload on object storage, where an object appears whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any

from etils import epath


# URLs through fsspec (gcsfs), not TensorFlow's filesystem: the layer orbax's
# metadata also takes, and one that honours STORAGE_EMULATOR_HOST, so the
# tests exercise the code path a pod uses. Read by epath at each call.
os.environ.setdefault("EPATH_USE_TF", "false")


def is_url(path: str | os.PathLike) -> bool:
  """True for ``scheme://...`` paths (object storage)."""
  return "://" in os.fspath(path)


def path(location: str | os.PathLike) -> epath.Path:
  """``location`` as an epath: local paths made absolute (``~`` expanded),
  URLs kept."""
  location = os.fspath(location)
  return epath.Path(location if is_url(location) else
                    os.path.abspath(os.path.expanduser(location)))


def write_bytes_atomic(target: epath.Path, data: bytes) -> None:
  """Writes ``data`` to ``target`` so that it appears whole or not at all.

  On a local disk through a temporary file, hidden and named after nothing
  (no reader, TensorBoard's included, takes it for the target's kind), then
  a rename; on object storage as one upload.
  """
  if is_url(target):
    target.write_bytes(data)
    return
  temporary = target.parent / f".partial.{os.getpid()}.{uuid.uuid4().hex}"
  try:
    temporary.write_bytes(data)
    temporary.replace(target)
  finally:
    if temporary.exists():
      temporary.unlink()


class DamagedFile(ValueError):
  """A file that exists but does not hold what it should (half of it, or
  bytes that are not its format)."""


def write_json_atomic(target: epath.Path, obj: Any) -> None:
  """Writes ``obj`` as indented, key-sorted strict JSON (no NaN or
  Infinity, which strict parsers refuse) to ``target``, atomically."""
  write_bytes_atomic(target, json.dumps(obj, indent=2, sort_keys=True,
                                        allow_nan=False).encode())


def read_json(source: epath.Path) -> Any | None:
  """The JSON in ``source``, or None if there is no such file.

  Raises:
    DamagedFile: ``source`` is not valid JSON (e.g. truncated).
  """
  if not source.exists():
    return None
  try:
    return json.loads(source.read_bytes())
  except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
    raise DamagedFile(f"{source} is damaged (not valid JSON: {error})"
                      ) from None


def local_size(folder: str | os.PathLike) -> int:
  """Bytes of the files under the local ``folder``."""
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(folder) for name in names)


def local_free_space(folder: str | os.PathLike) -> int:
  """Free bytes on the local disk that holds ``folder``."""
  return shutil.disk_usage(folder).free
