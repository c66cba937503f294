"""eqco_jax.program.storage: local files written whole, and workdirs on
object storage: a run, its kill and resume, and a linear
evaluation with every file in a bucket of a local GCS emulator (the real
fake-gcs-server binary), and nothing in the local working directory.

The emulator is reached the way a pod reaches GCS: epath through fsspec
(gcsfs, honouring ``STORAGE_EMULATOR_HOST``) for every JSON file, the
TensorBoard events and orbax's metadata, and TensorStore
(``TENSORSTORE_GCS_HTTP_URL``) for the checkpoint arrays.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time


import fakes
from helpers import LONG, LONG_STEPS, QUICK, ROOT, assert_same_tree, command
from helpers import environment, load_state
from eqco_jax.program import storage
from gcs_emulator import BUCKET, objects, read_object


def checkpoint_steps_in_bucket(host: str, run: str) -> list[int]:
  """Steps whose checkpoint orbax committed (on GCS: commit_success.txt)."""
  prefix = f"{run}/checkpoints/"
  steps = set()
  for name in objects(host, prefix):
    step, _, rest = name[len(prefix):].partition("/")
    if step.isdigit() and rest == "commit_success.txt":
      steps.add(int(step))
  return sorted(steps)


def bucket_env(host: str, devices: int = 1) -> dict:
  env = environment(devices)
  env.update(STORAGE_EMULATOR_HOST=host, TENSORSTORE_GCS_HTTP_URL=host)
  return env


def test_run_kill_resume_and_linear_eval_live_in_the_bucket(
    emulator, long_run, tmp_path):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  workdir = f"gs://{BUCKET}/runs/simo"
  process = subprocess.Popen(command(workdir, *LONG), cwd=cwd,
                             env=bucket_env(emulator), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not checkpoint_steps_in_bucket(emulator, "runs/simo"):
    assert process.poll() is None, process.stderr.read()[-3000:]
    assert time.time() < deadline, "no checkpoint reached the bucket"
    time.sleep(0.2)
  process.send_signal(signal.SIGKILL)
  process.wait()
  interrupted_at = checkpoint_steps_in_bucket(emulator, "runs/simo")
  assert interrupted_at and max(interrupted_at) < LONG_STEPS

  result = subprocess.run(command(workdir, *LONG), cwd=cwd,
                          env=bucket_env(emulator), capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resumed from the checkpoint of step" in result.stderr
  assert checkpoint_steps_in_bucket(emulator,
                                    "runs/simo")[-1] == LONG_STEPS
  assert_same_tree(load_state(long_run, LONG_STEPS),
                   load_state(workdir, LONG_STEPS))
  summary = json.loads(read_object(emulator, "runs/simo/summary.json"))
  local = json.loads((long_run / "summary.json").read_text())
  assert summary["final_loss"] == local["final_loss"]
  names = objects(emulator, "runs/simo/")
  for expected in ("runs/simo/config.json", "runs/simo/summary.json",
                   "runs/simo/progress.json"):
    assert expected in names
  assert any("/events.out.tfevents." in name for name in names)

  linear = subprocess.run(
      command(f"gs://{BUCKET}/runs/simo_linear",
              f"--config.pretrain_workdir={workdir}", "--config.epochs=2",
              config=os.path.join(ROOT, "configs", "linear_eval.py") +
              ":features"),
      cwd=cwd, env=bucket_env(emulator), capture_output=True, text=True,
      timeout=600)
  assert linear.returncode == 0, linear.stderr[-3000:]
  report = json.loads(read_object(emulator, "runs/simo_linear/linear_eval.json"))
  assert report["pretrain_step"] == LONG_STEPS
  assert 0.0 <= report["top1"] <= 1.0
  assert list(cwd.iterdir()) == []  # nothing written locally


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
