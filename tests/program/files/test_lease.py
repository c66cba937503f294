"""eqco_jax.program.files.lease: one writer per workdir (a second program run on a
held workdir: scenarios/test_pretraining.py)."""

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from eqco_jax.program.files import lease as lease_lib
from eqco_jax.program.files.workdir import Workdir


def _holder(tmp_path, **fields) -> dict:
  record = {"host": socket.gethostname(), "pid": 1, "since": 1.7e9,
            "renewed": time.time(), "token": "theirs", **fields}
  (tmp_path / "lease.json").write_text(json.dumps(record))
  return record


def test_a_lease_is_held_while_the_run_lives_then_given_back(tmp_path):
  with lease_lib.Lease(Workdir(tmp_path)) as held:
    record = json.loads((tmp_path / "lease.json").read_text())
    assert (record["host"], record["token"]) == (socket.gethostname(),
                                                 held.token)
  assert not (tmp_path / "lease.json").exists()


def test_a_live_holder_on_this_machine_is_named_at_once(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", "import time; "
                             "time.sleep(60)"])
  try:
    _holder(tmp_path, pid=holder.pid, since=1764979200.0)
    began = time.monotonic()
    with pytest.raises(lease_lib.WorkdirInUse) as error:
      lease_lib.Lease(Workdir(tmp_path)).take()
    assert time.monotonic() - began < 1
  finally:
    holder.kill()
  assert str(error.value) == (
      f"the workdir {tmp_path} is in use by the run of pid {holder.pid} on "
      f"{socket.gethostname()}, which has held it since 2025-12-06 00:00:00 "
      "UTC; wait for it to end (or stop it) and run the same command again, "
      "or choose another --workdir.")
  assert json.loads((tmp_path / "lease.json").read_text())["token"] == "theirs"


def test_a_killed_runs_lease_is_taken_over(tmp_path):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  _holder(tmp_path, pid=int(dead.stdout))
  with lease_lib.Lease(Workdir(tmp_path)) as held:
    assert json.loads((tmp_path / "lease.json").read_text())["token"] == (
        held.token)


def test_a_holder_elsewhere_is_refused_while_it_renews_and_else_replaced(
    tmp_path, monkeypatch):
  monkeypatch.setattr(lease_lib, "LEASE_SECS", 1.0)
  monkeypatch.setattr(lease_lib, "_POLL_SECS", 0.1)
  record = _holder(tmp_path, host="another-host")
  stop = threading.Event()

  def renew():
    while not stop.wait(0.2):
      record["renewed"] = time.time()
      (tmp_path / "lease.json").write_text(json.dumps(record))

  renewer = threading.Thread(target=renew)
  renewer.start()
  try:
    with pytest.raises(lease_lib.WorkdirInUse, match="on another-host"):
      lease_lib.Lease(Workdir(tmp_path)).take()
  finally:
    stop.set()
    renewer.join()
  began = time.monotonic()  # it stopped renewing: one lease period, then ours
  with lease_lib.Lease(Workdir(tmp_path)) as held:
    assert 1.0 <= time.monotonic() - began < 3
    assert json.loads((tmp_path / "lease.json").read_text())["token"] == (
        held.token)


def test_of_two_runs_that_start_together_one_goes_on(tmp_path):
  outcomes = []

  def start():
    try:
      outcomes.append(lease_lib.Lease(Workdir(tmp_path)).take())
    except lease_lib.WorkdirInUse as error:
      outcomes.append(error)

  runs = [threading.Thread(target=start) for _ in range(2)]
  for run in runs:
    run.start()
  for run in runs:
    run.join()
  held = [o for o in outcomes if isinstance(o, lease_lib.Lease)]
  assert len(held) == 1 and len(outcomes) == 2
  held[0].release()
