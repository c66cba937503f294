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

import os
import subprocess
import time

import fakes
from helpers import QUICK, command, environment
from eqco_jax.program.files import storage
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
