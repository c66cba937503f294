"""eqco_jax.program.files.lease: one writer per workdir (a second program run on a
held workdir: scenarios/test_pretraining.py; a refused 2-process run:
scenarios/test_multiprocess.py)."""

import json
import pathlib
import socket
import subprocess
import sys
import threading
import time

import jax
import pytest
from orbax.checkpoint import multihost

from helpers import LoggedWarnings
from eqco_jax.core.errors import UserError
from eqco_jax.program.files import lease as lease_lib
from eqco_jax.program.files.workdir import Workdir


def _holder(tmp_path, **fields) -> dict:
  record = {"host": socket.gethostname(), "pid": 1, "since": 1.7e9,
            "renewed": time.time(), "token": "theirs", **fields}
  (tmp_path / "lease.json").write_text(json.dumps(record))
  return record


def _sleeper() -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", "import time; "
                           "time.sleep(60)"])


def _identity_of(pid: int) -> dict:
  """The lease record's holder fields of this machine's process ``pid``."""
  return {**lease_lib.identity(), "pid": pid,
          "started": lease_lib._started(pid)}


def test_a_lease_is_held_while_the_run_lives_then_given_back(tmp_path):
  with lease_lib.Lease(Workdir(tmp_path)) as held:
    record = json.loads((tmp_path / "lease.json").read_text())
    assert (record["host"], record["token"]) == (socket.gethostname(),
                                                 held.token)
  assert not (tmp_path / "lease.json").exists()


@pytest.mark.parametrize("known", ["with its start time", "pid only"])
def test_a_live_holder_on_this_machine_is_named_at_once(tmp_path, known):
  """With its boot, pid namespace and start time (Linux), or its pid alone
  (a lease written where /proc is missing, or before they were recorded)."""
  holder = _sleeper()
  try:
    fields = (_identity_of(holder.pid) if known != "pid only"
              else {"pid": holder.pid})
    _holder(tmp_path, **fields, since=1764979200.0)
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


def test_a_killed_run_whose_exit_status_is_still_kept_is_no_holder(tmp_path):
  """A holder killed but not yet waited for by its parent (a zombie: its
  pid and start time remain) is taken over at once."""
  holder = _sleeper()
  _holder(tmp_path, **_identity_of(holder.pid))
  holder.kill()  # not waited for: a zombie
  stat = pathlib.Path(f"/proc/{holder.pid}/stat")
  while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
    time.sleep(0.01)
  with lease_lib.Lease(Workdir(tmp_path)) as held:
    assert json.loads((tmp_path / "lease.json").read_text())["token"] == (
        held.token)
  holder.wait()


def test_a_stale_lease_whose_pid_was_reused_here_is_taken_over_at_once(
    tmp_path):
  """A run of this machine killed, then its pid given to another live
  process (a restarted container keeps its host name and often its pids):
  that process's start time is not the holder's."""
  other = _sleeper()
  try:
    record = _identity_of(other.pid)
    _holder(tmp_path, **{**record, "started": record["started"] - 1})
    began = time.monotonic()
    with lease_lib.Lease(Workdir(tmp_path)) as held:
      assert time.monotonic() - began < 1
      assert json.loads((tmp_path / "lease.json").read_text())["token"] == (
          held.token)
  finally:
    other.kill()


@pytest.mark.parametrize("where", ["another boot", "another container"])
def test_a_holder_this_machine_cannot_ask_about_is_judged_by_its_renewals(
    tmp_path, where):
  """A lease written before a reboot of this machine, or in another pid
  namespace (a container of the same host name), names a pid that is not
  this machine's to ask about: like a holder elsewhere, it is taken over
  once unrenewed (here for 3 hours: at once) however alive that pid is."""
  key = "boot_id" if where == "another boot" else "pid_namespace"
  _holder(tmp_path, **{**lease_lib.identity(), key: "not this one", "pid": 1,
                      "renewed": time.time() - 3 * 3600})
  began = time.monotonic()
  with lease_lib.Lease(Workdir(tmp_path)) as held:
    assert time.monotonic() - began < 1
    assert json.loads((tmp_path / "lease.json").read_text())["token"] == (
        held.token)


def test_a_holder_elsewhere_is_refused_while_it_renews_and_else_replaced(
    tmp_path, monkeypatch):
  monkeypatch.setattr(lease_lib, "LEASE_SECS", 1.0)
  monkeypatch.setattr(lease_lib, "_POLL_SECS", 0.1)
  record = _holder(tmp_path, host="another-host", pid=4242)
  stop = threading.Event()

  def renew():
    while not stop.wait(0.2):
      record["renewed"] = time.time()
      (tmp_path / "lease.json").write_text(json.dumps(record))

  renewer = threading.Thread(target=renew)
  renewer.start()
  try:
    with LoggedWarnings() as logged, pytest.raises(
        lease_lib.WorkdirInUse, match="on another-host"):
      lease_lib.Lease(Workdir(tmp_path)).take()
  finally:
    stop.set()
    renewer.join()
  # While it waits, one line says for whom and for how long at most.
  assert len(logged.messages) == 1 and logged.messages[0].startswith(
      f"The workdir {tmp_path} is held by pid 4242 on another-host (renewed ")
  assert logged.messages[0].endswith(
      "which this machine cannot check: waiting up to 1 s for it to renew its "
      "lease (then this run stops) or stay silent (then this run takes the "
      "workdir over).")
  began = time.monotonic()  # it stopped renewing: one lease period, then ours
  with lease_lib.Lease(Workdir(tmp_path)) as held:
    assert 1.0 <= time.monotonic() - began < 3
    assert json.loads((tmp_path / "lease.json").read_text())["token"] == (
        held.token)


def test_of_two_runs_that_start_together_one_goes_on(tmp_path, monkeypatch):
  """Two threads stand for the processes of two runs: each has the
  identity of a live process of its own."""
  sleepers = [_sleeper(), _sleeper()]
  identities = [_identity_of(s.pid) for s in sleepers]
  own = threading.local()
  monkeypatch.setattr(lease_lib, "identity",
                      lambda: getattr(own, "identity", identities[0]))
  outcomes = []

  def start(identity):
    own.identity = identity
    try:
      outcomes.append(lease_lib.Lease(Workdir(tmp_path)).take())
    except lease_lib.WorkdirInUse as error:
      outcomes.append(error)

  runs = [threading.Thread(target=start, args=(i,)) for i in identities]
  try:
    for run in runs:
      run.start()
    for run in runs:
      run.join()
  finally:
    for sleeper in sleepers:
      sleeper.kill()
  held = [o for o in outcomes if isinstance(o, lease_lib.Lease)]
  assert len(held) == 1 and len(outcomes) == 2
  held[0].release()


def test_a_lease_file_that_cannot_be_read_is_one_sentence(tmp_path):
  (tmp_path / "lease.json").mkdir()
  with pytest.raises(UserError) as error:
    lease_lib.Lease(Workdir(tmp_path)).take()
  assert str(error.value) == (
      f"cannot read the lease file {tmp_path}/lease.json of the workdir "
      f"{tmp_path} (IsADirectoryError: [Errno 21] Is a directory: "
      f"'{tmp_path}/lease.json'); it is a small JSON file this program writes "
      "while a run holds the workdir: remove it (or make it readable) and run "
      "the same command again.")


def test_a_lease_taken_over_stops_its_holder_at_its_next_check(
    tmp_path, monkeypatch):
  """The renewer notices in one renewal period, says so once and renews no
  more; the next check (before a save) raises the one sentence."""
  monkeypatch.setattr(lease_lib, "RENEW_SECS", 0.05)
  with LoggedWarnings() as logged, lease_lib.Holding(Workdir(tmp_path)) as held:
    lease_lib.check_held(10)  # still this run's
    theirs = _holder(tmp_path, host="host-b", pid=4242, since=1764979200.0)
    time.sleep(0.5)
    assert json.loads((tmp_path / "lease.json").read_text()) == theirs
    with pytest.raises(lease_lib.LeaseTaken) as error:
      lease_lib.check_held(20)
    assert held.lease.taken_by == theirs
  assert logged.messages == [
      f"The lease of {tmp_path} was taken over by pid 4242 on host-b; this "
      "run stops at its next checkpoint, without saving it."]
  assert str(error.value) == (
      f"the workdir {tmp_path} was taken over by the run of pid 4242 on "
      "host-b at 2025-12-06 00:00:00 UTC, which found this run's lease "
      "unrenewed for 60 s; this run stopped at step 20 without saving it, "
      "leaving the workdir to that run: run the same command again once that "
      "run has ended (it resumes from the newest checkpoint), or choose "
      "another --workdir.")
  # Released, it leaves the other run's lease alone; no check is held now.
  assert json.loads((tmp_path / "lease.json").read_text()) == theirs
  lease_lib.check_held(30)


class _Coordination:
  """The key-value store of JAX's coordination service, in one process."""

  def __init__(self, **values):
    self.values = values

  def key_value_set(self, key, value):
    assert key not in self.values
    self.values[key] = value

  def blocking_key_value_get(self, key, timeout_in_ms):
    assert timeout_in_ms >= 60_000
    return self.values[key]


@pytest.mark.parametrize("process", [0, 1])
def test_every_process_of_a_run_stops_with_process_0s_sentence(
    tmp_path, monkeypatch, process):
  """Process 0 takes the lease and tells the others what came of it: a
  refusal is the same sentence on every process."""
  refusal = (f"the workdir {tmp_path} is in use by the run of pid 1 on h, "
             "which has held it since 2025-12-06 00:00:00 UTC; wait for it "
             "to end (or stop it) and run the same command again, or choose "
             "another --workdir.")
  store = _Coordination(**({} if process == 0 else {
      "eqco_jax:lease/take": refusal}))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: process)
  monkeypatch.setattr(multihost, "get_jax_distributed_client", lambda: store)
  monkeypatch.setattr(lease_lib, "_alive_here", lambda holder: True)
  _holder(tmp_path, host="h", since=1764979200.0)
  with pytest.raises(UserError) as error:
    with lease_lib.Holding(Workdir(tmp_path)):
      pytest.fail("a refused run went on")
  assert str(error.value) == refusal
  assert store.values == {"eqco_jax:lease/take": refusal}


def test_process_0_tells_the_others_the_lease_is_held_and_still_held(
    tmp_path, monkeypatch):
  store = _Coordination()
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  monkeypatch.setattr(multihost, "get_jax_distributed_client", lambda: store)
  with lease_lib.Holding(Workdir(tmp_path)):
    lease_lib.check_held(4)
    lease_lib.check_held(8)
  assert store.values == {"eqco_jax:lease/take": "",
                          "eqco_jax:lease/check_1_step_4": "",
                          "eqco_jax:lease/check_2_step_8": ""}
