"""Two real processes x 4 CPU devices on loopback (launch/local_processes.sh):
the same run as one process x 8 devices. (A run that loses a process and
resumes with the same command: test_launch.py, through the TPU-pod and SLURM
launchers; a single process killed and resumed: program/files/test_storage.py.)"""

import json
import os
import socket
import subprocess
import time

import numpy as np
import pytest

import documented as docs
import fakes
from helpers import QUICKSTART_TO_TINY, ROOT, SHARED_RUN
from helpers import assert_same_state_up_to_reassociation, command
from helpers import environment, xla_flags
from eqco_jax.program.files import lease

pytestmark = pytest.mark.xdist_group("processes")  # see conftest


def launcher(*extra) -> str:
  """The header's usage line of launch/local_processes.sh, as typed, with
  the tiny variant's sizes and SHARED_RUN appended."""
  usage = docs.documented(r"launch/local_processes\.sh .*")
  return " ".join([usage, "--", *QUICKSTART_TO_TINY, *SHARED_RUN, *extra])


def launcher_environment() -> dict:
  env = dict(os.environ, PORT=str(fakes.free_port()))
  env["XLA_FLAGS"] = xla_flags(None)  # the launcher adds the device count
  return env


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """An uninterrupted 2 x 4 run of the usage line: its workdir."""
  sandbox = docs.make_sandbox(tmp_path_factory.mktemp("two_processes"))
  result = docs.shell(launcher(), sandbox, env=launcher_environment(),
                      timeout=400)
  workdir = sandbox / "runs" / "two_processes"
  logs = [(workdir / f"process_{i}.log").read_text() for i in (0, 1)]
  assert result.returncode == 0, logs[0][-3000:] + logs[1][-3000:]
  return workdir


def test_two_processes_match_one_process_and_write_files_once(
    two_process_run, eight_device_run):
  single, multi = eight_device_run[0], two_process_run
  log = (multi / "process_1.log").read_text()
  assert "[process 1/2]" in log and "8 global devices" in log

  one = json.loads((single / "summary.json").read_text())
  two = json.loads((multi / "summary.json").read_text())
  assert two["num_devices"] == one["num_devices"] == 8
  np.testing.assert_allclose(two["final_loss"], one["final_loss"], rtol=1e-5)
  # The same random-init baseline; the learned kNN within a few of 1,000
  # digits (the final states differ by float reassociation only).
  assert two["baseline_linear_top1"] == one["baseline_linear_top1"]
  assert abs(two["knn_top1"] - one["knn_top1"]) <= 0.003
  # Checkpoints written by both processes together hold the same final state.
  assert sorted(os.listdir(multi / "checkpoints")) == ["4", "8"]
  assert_same_state_up_to_reassociation(single, multi)
  # Summary, config and TensorBoard events once, by process 0.
  events = [n for n in os.listdir(multi) if n.startswith("events.out")]
  assert len(events) == 1


def test_a_refused_two_process_run_says_one_sentence_in_every_process(
    tmp_path):
  """Two processes started on a workdir whose lease a live process of this
  machine holds (this test's): process 0 is refused, and tells process 1,
  which stops at once with the same sentence; neither writes a traceback."""
  workdir = tmp_path / "held"
  workdir.mkdir()
  holder = {**lease.identity(), "since": 1764979200.0,
            "renewed": time.time(), "token": "this test's"}
  (workdir / "lease.json").write_text(json.dumps(holder))
  address = f"localhost:{fakes.free_port()}"
  processes = [subprocess.Popen(
      command(workdir, f"--coordinator_address={address}",
              "--num_processes=2", f"--process_id={i}", *SHARED_RUN),
      cwd=ROOT, env=environment(4), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in (0, 1)]
  began = time.monotonic()
  stderr = [p.communicate(timeout=240)[1] for p in processes]
  assert time.monotonic() - began < 60, stderr
  sentence = (
      f"error: the workdir {workdir} is in use by the run of pid "
      f"{os.getpid()} on {socket.gethostname()}, which has held it since "
      "2025-12-06 00:00:00 UTC; wait for it to end (or stop it) and run the "
      "same command again, or choose another --workdir.")
  for process, text in zip(processes, stderr):
    assert process.returncode == 1, text[-3000:]
    assert text.strip().splitlines()[-1] == sentence, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
  assert sorted(p.name for p in workdir.iterdir()) == ["lease.json"]
