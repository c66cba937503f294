"""The path layer: every file a run, the linear evaluation or the K sweep
reads or writes under a workdir goes through here.

Paths are ``etils.epath`` paths, so a workdir may be local or on object
storage (``gs://BUCKET/...``) and a URL is never handed to ``os.path``.
``main`` makes epath use fsspec (gcsfs) rather than TensorFlow's filesystem
for URLs, the same layer orbax uses and the one the tests run against a
local GCS emulator. JSON files are written so that no reader sees half of
one: through a temporary file and a rename on a local disk; as one object
upload on object storage, where an object appears whole or not at all.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from etils import epath

from eqco_jax.errors import UserError

# URLs through fsspec (gcsfs), not TensorFlow's filesystem: the layer orbax's
# metadata also takes, and one that honours STORAGE_EMULATOR_HOST, so the
# tests exercise the code path a pod uses. Read by epath at each call.
os.environ.setdefault("EPATH_USE_TF", "false")


def is_url(path: str | os.PathLike) -> bool:
  """True for ``scheme://...`` paths (object storage)."""
  return "://" in os.fspath(path)


def path(location: str | os.PathLike) -> epath.Path:
  """``location`` as an epath: local paths made absolute, URLs kept."""
  location = os.fspath(location)
  return epath.Path(location if is_url(location) else
                    os.path.abspath(location))


def write_bytes_atomic(target: epath.Path, data: bytes) -> None:
  """Writes ``data`` to ``target`` so that it appears whole or not at all."""
  if is_url(target):
    target.write_bytes(data)
    return
  temporary = target.parent / (target.name + ".tmp")
  temporary.write_bytes(data)
  temporary.replace(target)


def write_json_atomic(target: epath.Path, obj: Any) -> None:
  """Writes ``obj`` as indented, key-sorted JSON to ``target``, atomically."""
  write_bytes_atomic(target, json.dumps(obj, indent=2, sort_keys=True)
                     .encode())


def read_json(source: epath.Path) -> Any | None:
  """The JSON in ``source``, or None if there is no such file."""
  if not source.exists():
    return None
  return json.loads(source.read_text())


def prepare_workdir(workdir: str | os.PathLike) -> epath.Path:
  """Creates ``workdir`` (and checks it can be written) before any work.

  Raises UserError, one sentence naming the location and the problem
  (missing bucket, credentials, network, permissions), instead of a
  traceback later in the run.
  """
  directory = path(workdir)
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write_check.{socket.gethostname()}.{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except Exception as error:  # any backend's failure, said in one sentence
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    raise UserError(
        f"cannot write to the workdir {os.fspath(workdir)} "
        f"({type(error).__name__}: {reason}); check that the location "
        "exists and that this machine's credentials (for gs://: gcloud auth "
        "application-default login, or the VM's service account) and network "
        "reach it, or choose another --workdir.") from None
  return directory
