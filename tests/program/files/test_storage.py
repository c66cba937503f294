"""eqco_jax.program.files.storage: local files written whole, and workdirs on
object storage (a local GCS emulator, the real fake-gcs-server binary): a
missing or unreachable bucket, and JSON records appearing whole. A whole run,
its kill and resume and its linear evaluation in a bucket:
tests/scenarios/test_image_folder.py.

The emulator is reached the way a pod reaches GCS: epath through fsspec
(gcsfs, honouring ``STORAGE_EMULATOR_HOST``) for every JSON file, the
TensorBoard events and orbax's metadata, and TensorStore
(``TENSORSTORE_GCS_HTTP_URL``) for the checkpoint arrays.
"""

from __future__ import annotations

import http.server
import os
import re
import subprocess
import threading
import time
import types

import pytest

import fakes
from helpers import QUICK, command, environment
from eqco_jax.core.errors import UserError
from eqco_jax.program.files import storage
from eqco_jax.program.torchvision import reading
from gcs_emulator import BUCKET, client_env, objects


def bucket_env(host: str) -> dict:
  return client_env(host, environment(1))


def test_a_missing_or_unreachable_bucket_stops_at_start_in_one_sentence(
    emulator, tmp_path):
  workdir = "gs://no-such-bucket/runs/simo"
  result = subprocess.run(command(workdir, config=QUICK), cwd=tmp_path,
                          env=bucket_env(emulator), capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: cannot write to the workdir {workdir} (FileNotFoundError: "
      "Bucket does not exist: no-such-bucket); check that the location "
      "exists and that this machine's credentials (for gs://: gcloud auth "
      "application-default login, or the VM's service account) and network "
      "reach it, or choose another --workdir.")
  assert list(tmp_path.iterdir()) == []
  # An endpoint that does not answer (gcsfs alone retries for a minute).
  env = dict(bucket_env(emulator),
             STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{fakes.free_port()}")
  began = time.time()
  result = subprocess.run(command(workdir, config=QUICK), cwd=tmp_path,
                          env=env, capture_output=True, text=True,
                          timeout=120)
  assert time.time() - began < 20
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      f"error: cannot write to the workdir {workdir} (TimeoutError: no answer "
      "within 15 s); check that the location exists and that this machine's "
      "credentials (for gs://: gcloud auth application-default login, or the "
      "VM's service account) and network reach it, or choose another "
      "--workdir."]


def test_files_appear_whole_on_a_local_disk_and_in_a_bucket(emulator,
                                                           tmp_path):
  assert storage.is_url("gs://b/x") and not storage.is_url("runs/x")
  assert str(storage.path("runs/x")) == os.path.abspath("runs/x")
  assert str(storage.path("gs://b/x")) == "gs://b/x"
  for folder in (storage.path(tmp_path),
                 storage.path(f"gs://{BUCKET}/storage_test")):
    target = folder / "record.json"
    assert storage.read_json(target) is None
    storage.write_json_atomic(target, {"b": [1, 2], "a": None})
    assert storage.read_json(target) == {"a": None, "b": [1, 2]}
    assert target.read_text() == '{\n  "a": null,\n  "b": [\n    1,\n    2\n  ]\n}'
    storage.write_bytes_atomic(target, b"{}")  # replaced whole
    assert storage.read_json(target) == {}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]
  assert objects(emulator, "storage_test/") == ["storage_test/record.json"]


class _Trickle(http.server.BaseHTTPRequestHandler):
  """Promises 100 kB and sends a byte every 0.05 s (3 s of the program's
  clock in the test below) until the client hangs up."""

  def do_GET(self):  # pylint: disable=invalid-name
    self.send_response(200)
    self.send_header("Content-Length", "100000")
    self.end_headers()
    try:
      for _ in range(2000):
        self.wfile.write(b"x")
        self.wfile.flush()
        time.sleep(0.05)
    except OSError:  # the client gave up
      pass
    self.close_connection = True

  def log_message(self, *args):  # quiet
    pass


def test_an_init_from_url_that_trickles_is_given_up_in_one_sentence_within_its_window(
    tmp_path, monkeypatch):
  """A server that sends a byte every 3 s is never silent for the timeout;
  with the shipped SLOW_BYTES and SLOW_WINDOW_SECS (10 kB in 30 s) the
  download is given up at the first byte after 30 s (within 60 s whatever
  the pace: a byte at least every timeout), in one sentence, and leaves
  no file. (The program's clock runs 60 times as fast as the
  server's: 0.05 s between bytes is 3 s to it, so the test takes 0.5 s.)"""
  real, start = time.monotonic, time.monotonic()
  clock = lambda: start + 60 * (real() - start)
  monkeypatch.setattr(storage, "time", types.SimpleNamespace(monotonic=clock))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
  threading.Thread(target=server.serve_forever, args=(0.05,),
                   daemon=True).start()
  url = f"http://127.0.0.1:{server.server_address[1]}/r18.pth"
  try:
    with pytest.raises(UserError) as error:
      reading.read_backbone_state(url, storage.path(tmp_path / "cache"))
    took = clock() - start
  finally:
    server.shutdown()
    server.server_close()
  # Given up at the first byte after the window: at the latest one
  # timeout (the longest a byte may take) after it.
  assert storage.SLOW_WINDOW_SECS < took < (
      storage.SLOW_WINDOW_SECS + reading.DOWNLOAD_TIMEOUT_SECS)
  message = str(error.value)
  assert re.fullmatch(
      rf"cannot download config\.init_from={re.escape(url)} \(ConnectionError:"
      r" the server sent \d+ bytes in the last 30 s, under 10000 \(a "
      r"download that slow is given up\)\); check the URL .*\.", message)
  assert "\n" not in message and message.count(". ") == 0
  assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
