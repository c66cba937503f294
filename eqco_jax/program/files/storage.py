"""Where files live, local disk or object storage: every file a run, the
linear evaluation, the export or the K sweep reads or writes goes through
here (what a workdir holds is :mod:`eqco_jax.program.files.workdir`).

Paths are ``etils.epath`` paths, so a workdir may be local or on object
storage (``gs://BUCKET/...``) and a URL is never handed to ``os.path``.
This module makes epath use fsspec (gcsfs) rather than TensorFlow's
filesystem for URLs, the same layer orbax uses and the one the tests run
against a local GCS emulator; ``http(s)://`` files are downloaded once into
a local cache (:func:`cached_download`). JSON files are written so that no
reader sees half of one: through a temporary file and a rename on a local
disk; as one object upload on object storage, where an object appears whole
or not at all.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import shutil
import socket
import threading
import time
import urllib.parse
import urllib.request
import uuid
from typing import Any, BinaryIO, Callable, Iterator

from absl import logging
from etils import epath

from eqco_jax.core.errors import UserError, one_line


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


@contextlib.contextmanager
def _replaced_whole(target: epath.Path) -> Iterator[epath.Path]:
  """Yields a temporary file beside the local ``target``, hidden and named
  after nothing (no reader, TensorBoard's included, takes it for the
  target's kind), which becomes ``target`` by a rename once the block ends
  without an exception; it is removed in any case."""
  temporary = target.parent / f".partial.{os.getpid()}.{uuid.uuid4().hex}"
  try:
    yield temporary
    temporary.replace(target)
  finally:
    if temporary.exists():
      temporary.unlink()


def write_bytes_atomic(target: epath.Path, data: bytes) -> None:
  """Writes ``data`` to ``target`` so that it appears whole or not at all:
  on a local disk through a temporary file and a rename, on object storage
  as one upload."""
  if is_url(target):
    target.write_bytes(data)
    return
  with _replaced_whole(target) as temporary:
    temporary.write_bytes(data)


def open_to_append(target: epath.Path) -> BinaryIO:
  """The local file ``target`` (created if missing, with its folder) open
  to append without a buffer: each ``write`` is one system call, which a
  reader holding the file sees at once and a killed process does not lose.
  (An object on object storage cannot grow.)"""
  target.parent.mkdir(parents=True, exist_ok=True)
  return open(target, "ab", buffering=0)  # pylint: disable=consider-using-with


def _write_check(directory: epath.Path) -> None:
  """Creates ``directory`` and writes and removes a file in it, named after
  this host and process (so that the processes of a run do not meet)."""
  directory.mkdir(parents=True, exist_ok=True)
  probe = directory / f".write_check.{socket.gethostname()}.{os.getpid()}"
  probe.write_text("ok")
  probe.unlink()


def _within_timeout(seconds: float, fn: Callable[..., Any], *args) -> None:
  """``fn(*args)`` in a daemon thread, whose failure it raises; TimeoutError
  if it takes longer than ``seconds`` (the thread is left to itself and
  does not keep the process alive)."""
  outcome = []

  def call():
    try:
      fn(*args)
      outcome.append(None)
    except BaseException as error:  # pylint: disable=broad-except
      outcome.append(error)

  thread = threading.Thread(target=call, daemon=True)
  thread.start()
  thread.join(seconds)
  if not outcome:
    raise TimeoutError(f"no answer within {seconds:.0f} s")
  if outcome[0] is not None:
    raise outcome[0]


def check_writable(location: str | os.PathLike, seconds: float, *,
                   what: str, remedy: str) -> None:
  """Creates the folder ``location`` and writes a file in it (removed
  again), before any work.

  Raises:
    UserError: one sentence naming ``what`` is at ``location``, the
      backend's failure (missing bucket, credentials, network, permissions)
      and ``remedy``. On object storage, not answering within ``seconds`` is
      such a failure (gcsfs alone retries for a minute or more).
  """
  directory = path(location)
  try:
    if is_url(location):
      _within_timeout(seconds, _write_check, directory)
    else:
      _write_check(directory)
  except Exception as error:  # any backend's failure, said in one sentence
    raise UserError(
        f"cannot write to {what} {os.fspath(location)} ({one_line(error)}); "
        "check that the location exists and that this machine's credentials "
        "(for gs://: gcloud auth application-default login, or the VM's "
        f"service account) and network reach it, or {remedy}.") from None


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


def local_text(file: str | os.PathLike) -> str | None:
  """The text of the local ``file`` (such as /proc's), stripped; None if it
  cannot be read (no such file, no /proc)."""
  try:
    with open(file) as f:
      return f.read().strip()
  except OSError:
    return None


# The local folder of downloaded files, if set; else $XDG_CACHE_HOME (or
# ~/.cache) /eqco_jax/downloads.
DOWNLOAD_CACHE_ENV = "EQCO_JAX_DOWNLOAD_CACHE"


def is_web_url(location: str | os.PathLike) -> bool:
  """True for ``http://`` and ``https://`` locations."""
  return os.fspath(location).lower().startswith(("http://", "https://"))


def download_cache() -> epath.Path:
  """Where :func:`cached_download` keeps files: ``$EQCO_JAX_DOWNLOAD_CACHE``,
  else ``$XDG_CACHE_HOME/eqco_jax/downloads``, else
  ``~/.cache/eqco_jax/downloads``."""
  folder = os.environ.get(DOWNLOAD_CACHE_ENV)
  if not folder:
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    folder = os.path.join(base, "eqco_jax", "downloads")
  return path(folder)


def download_target(url: str, cache: epath.Path) -> epath.Path:
  """The file under ``cache`` that holds ``url``: a folder named after a
  hash of the whole URL, holding a file with the URL's basename (so its
  suffix, ``.safetensors`` or ``.pth``, still says what it is)."""
  url_path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
  name = os.path.basename(url_path)
  digest = hashlib.sha256(url.encode()).hexdigest()[:16]
  return cache / digest / (name or "download")


# A download slower than this over the window, or silent for the timeout,
# is given up: a server that trickles would otherwise hold a run for ever.
SLOW_BYTES, SLOW_WINDOW_SECS = 10_000, 30.0
# How often a long download says how far it is.
PROGRESS_SECS = 10.0


def download(url: str, target: epath.Path, timeout: float) -> None:
  """Copies ``url`` to the local file ``target`` so that it appears whole
  or not at all (a temporary file beside it, then a rename), logging its
  progress every PROGRESS_SECS.

  Raises:
    OSError: the server cannot be reached, answers an HTTP error
      (``urllib.error.HTTPError``), stops answering for ``timeout`` seconds,
      sends fewer than SLOW_BYTES in SLOW_WINDOW_SECS or less than it
      announced (ConnectionError).
    http.client.HTTPException: the answer ends early or is malformed.
  """
  target.parent.mkdir(parents=True, exist_ok=True)
  with _replaced_whole(target) as temporary:
    with urllib.request.urlopen(url, timeout=timeout) as response:
      length = response.headers.get("Content-Length")
      with open(temporary, "wb") as out:
        _copy_watched(response, out, url, length)
        size = out.tell()
    if length is not None and length.isdigit() and size != int(length):
      raise ConnectionError(f"the answer ended after {size} of {length} "
                            "bytes")


def _copy_watched(response: Any, out: Any, url: str,
                  length: str | None) -> None:
  """Copies ``response`` into ``out`` while the server keeps sending at
  least SLOW_BYTES per SLOW_WINDOW_SECS (ConnectionError otherwise)."""
  start = said = time.monotonic()
  window: collections.deque[tuple[float, int]] = collections.deque()
  received = 0
  while chunk := response.read1(1 << 20):
    out.write(chunk)
    received += len(chunk)
    now = time.monotonic()
    window.append((now, received))
    while window[0][0] < now - SLOW_WINDOW_SECS:
      window.popleft()
    if now - start > SLOW_WINDOW_SECS and (
        received - window[0][1] < SLOW_BYTES):
      raise ConnectionError(
          f"the server sent {received - window[0][1]} bytes in the last "
          f"{SLOW_WINDOW_SECS:.0f} s, under {SLOW_BYTES} (a download that "
          "slow is given up)")
    if now - said > PROGRESS_SECS:
      said = now
      of = f" of {int(length) / 1e6:.1f}" if length and length.isdigit() else ""
      logging.info("Downloading %s: %.1f%s MB.", url, received / 1e6, of)


def cached_download(url: str, timeout: float,
                    cache: epath.Path | None = None) -> epath.Path:
  """The local copy of ``url`` under ``cache`` (default
  :func:`download_cache`), downloaded (:func:`download`) unless an earlier
  call left it there; raises what :func:`download` raises."""
  target = download_target(url, download_cache() if cache is None else cache)
  if not target.is_file():
    download(url, target, timeout)
  return target
