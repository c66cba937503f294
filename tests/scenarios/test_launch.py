"""The launchers, run end to end through the fake gcloud, sbatch and srun of
tests/fakes: a SLURM job of 2 tasks and a TPU VM of 2 workers, each with 4
CPU devices, end in the state of one process with 8 devices, survive a killed
task (SLURM) and stop cleanly on a worker's SIGTERM (TPU) by the same command
started again, and tpu_pod.sh --setup makes a Python 3.11 environment with uv
from local wheels."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

import fakes
import documented as docs
from helpers import ROOT, SHARED_RUN, checkpoint_steps, environment
from helpers import assert_same_state_up_to_reassociation
from helpers import sigint_reaches_children

TPU = (f"--name={fakes.TPU_NAME}", f"--zone={fakes.ZONE}")

# The launchers run the quick start's tiny variant (docs.LAUNCHER_RECIPE).
RECIPE = docs.LAUNCHER_RECIPE
LAUNCHED = (*SHARED_RUN, "--config.final_eval=False")


def run(argv, env, cwd=ROOT, timeout=60) -> subprocess.CompletedProcess:
  return subprocess.run(argv, env=env, cwd=cwd, capture_output=True,
                        text=True, timeout=timeout)


def assert_same_state_as_eight_devices(single, workdir) -> None:
  """Step 8 of ``workdir`` is the 1 x 8 run's (as in test_multiprocess)."""
  assert checkpoint_steps(workdir)[-1] == 8
  assert_same_state_up_to_reassociation(single, workdir)


def start_until_a_checkpoint(command, env, workdir) -> subprocess.Popen:
  """Starts ``command`` (output piped) and returns once ``workdir`` holds a
  checkpoint."""
  process = subprocess.Popen(command, env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
  deadline = time.time() + 400
  while not checkpoint_steps(workdir):
    assert process.poll() is None, process.stdout.read()[-3000:]
    assert time.time() < deadline, "no checkpoint in time"
    time.sleep(0.02)
  return process


def kill_one_and_resume(command, env, workdir, variable, log) -> str:
  """Starts ``command``; after the step-4 checkpoint SIGKILLs the python
  process with ``variable=1``; checks that the launcher stops the other and
  fails; runs ``command`` again to the end. Returns the first run's output."""
  first = start_until_a_checkpoint(command, env, workdir)
  victim = fakes.processes_with(variable, "1", f"--workdir={workdir}")
  assert len(victim) == 1, victim
  os.kill(victim[0], signal.SIGKILL)
  try:  # The survivor must not wait forever in its collectives.
    output, _ = first.communicate(timeout=60)
  except subprocess.TimeoutExpired:
    first.kill()
    raise
  assert first.returncode != 0
  assert fakes.processes_with(variable, "0", f"--workdir={workdir}") == []
  assert checkpoint_steps(workdir) == [4]

  second = run(command, env, timeout=400)
  text = second.stdout + second.stderr + log()
  assert second.returncode == 0, "\n".join(
      line[:300] for line in text.splitlines() if re.search(
          r"rror|Fatal|^[EF]\d{4}|Abort|Terminat|exited", line))[-6000:]
  for i in (0, 1):
    assert f"[process {i}/2] Resumed from the checkpoint of step 4." in text
    assert f"[process {i}/2] Process {i}/2, 4 local / 8 global devices" in text
  return output + log()


@pytest.mark.xdist_group("processes")  # see conftest
def test_gpu_host_runs_one_process_on_every_device(eight_device_run):
  """The session's 1 x 8 run is gpu_host.sh's usage line (conftest)."""
  workdir, result = eight_device_run
  assert "1 local / 1 global devices" not in result.stderr
  assert "[process 0/1] Process 0/1, 8 local / 8 global devices" in (
      result.stderr)
  assert checkpoint_steps(workdir) == [4, 8]
  summary = json.loads((workdir / "summary.json").read_text())
  assert (summary["num_devices"], summary["steps"]) == (8, 8)


@pytest.mark.xdist_group("processes")  # see conftest
def test_slurm_job_resumes_after_a_killed_task(tmp_path, eight_device_run):
  """``sbatch --nodes=2 --gpus-per-node=4 launch/slurm.sbatch``: JAX finds
  the coordinator from the srun tasks' SLURM_* variables; --kill-on-bad-exit
  ends the survivor; the same command resumes."""
  env = fakes.fake_env(tmp_path, num_workers=2, devices_per_worker=4)
  workdir, logs = tmp_path / "run", tmp_path / "logs"
  logs.mkdir()
  command = docs.usage_line(r"sbatch .*launch/slurm\.sbatch .*", workdir,
                            sbatch=f"sbatch --output={logs}/%x-%j.out",
                            **RECIPE)
  command += LAUNCHED
  log = lambda: "".join(p.read_text() for p in sorted(logs.iterdir()))
  first = kill_one_and_resume(command, env, workdir, "SLURM_PROCID", log)
  # JAX took the coordinator from SLURM's variables: the port from the job id.
  job = int(re.search(r"Submitted batch job (\d+)", first).group(1))
  assert f"on localhost:{61440 + job % 4096}" in first
  assert "srun (fake): task 1 exited with status 137" in first
  assert "srun (fake): stopping the other tasks" in first
  assert len(list(logs.glob("eqco-jax-*.out"))) == 2  # #SBATCH --job-name
  assert_same_state_as_eight_devices(eight_device_run[0], workdir)


# The shipped cadence (configs default: a checkpoint every 1,000 steps, a log
# line every 50), which the tiny variant's 2 and 2 would hide; the run is
# far from its end when it is stopped.
SHIPPED_CADENCE = ("--config.checkpoint_every_steps=1000",
                   "--config.log_every_steps=50",
                   "--config.num_train_steps=100000", "--config.final_eval=False")


def _signal_one_worker(command, env, workdir, after: str,
                       signum=signal.SIGTERM) -> tuple[str, float]:
  """Starts ``command`` (a fake pod of two workers); once both have logged
  ``after``, sends ``signum`` to worker 1 and returns ``(the output,
  seconds from the signal until every worker had exited)``."""
  sigint_reaches_children()
  pod = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
  lines, seen = [], set()
  deadline = time.time() + 400
  for line in pod.stdout:
    lines.append(line)
    seen |= {i for i in ("0", "1") if f"[process {i}/2] {after}" in line}
    if seen == {"0", "1"}:
      break
    assert time.time() < deadline, "".join(lines[-60:])
  time.sleep(2)  # both are training by now
  victim = fakes.processes_with("TPU_WORKER_ID", "1", f"--workdir={workdir}")
  assert len(victim) == 1, victim
  os.kill(victim[0], signum)
  sent = time.time()
  try:
    rest, _ = pod.communicate(timeout=120)
  except subprocess.TimeoutExpired:  # a hang: say where each worker was
    for worker in ("0", "1"):  # (they hold the output pipe open)
      for pid in fakes.processes_with("TPU_WORKER_ID", worker,
                                      f"--workdir={workdir}"):
        os.kill(pid, signal.SIGKILL)
    pod.kill()
    rest, _ = pod.communicate()
    raise AssertionError("the workers did not exit within 120 s of the "
                         f"{signum.name}; their last lines:\n" + "".join(
                             (lines + [rest])[-60:])) from None
  exited = time.time() - sent
  output = "".join(lines) + rest
  assert pod.returncode == 0, output[-3000:]
  return output, exited


@pytest.mark.xdist_group("processes")  # see conftest
def test_tpu_pod_saves_one_step_on_every_worker_when_one_gets_sigterm(
    tmp_path):
  """``launch/tpu_pod.sh`` at the shipped cadence: a SIGTERM to one worker
  (a preemption notice), once both have compiled, reaches the other through
  JAX's preemption service; both save the same step and every worker has
  exited 0 within 10 s of the signal; the same command resumes from that
  step on both, both workers reading the compilation cache beside the
  workdir (each has a home of its own, as hosts do), and stops the same way
  after a SIGINT (Ctrl-C) to one worker."""
  usage = docs.usage_line(r"launch/tpu_pod\.sh --name=.*", tmp_path / "run",
                          **RECIPE)
  env = fakes.fake_env(tmp_path, tpu_name=usage[1].split("=")[1],
                       zone=usage[2].split("=")[1])
  del env["JAX_COMPILATION_CACHE_DIR"]  # the suite's: the default here
  workdir = tmp_path / "run"
  command = ["bash", *usage, "--", *SHIPPED_CADENCE]
  output, exited = _signal_one_worker(command, env, workdir,
                                      "Compiled the train step")
  saved = re.findall(r"\[process (\d)/2\] Stopped at step (\d+) after "
                     r"SIGTERM", output)
  assert sorted(saved) == [("0", saved[0][1]), ("1", saved[0][1])], (
      output[-3000:])
  step = int(saved[0][1])
  assert checkpoint_steps(workdir) == [step]
  assert exited < 10, exited

  # Then a Ctrl-C to one worker: JAX's service has SIGTERM, the SIGINT is
  # handed to it as one, and both stop at the same step again.
  output, exited = _signal_one_worker(command, env, workdir,
                                      "Compiled the train step",
                                      signal.SIGINT)
  stopped = re.findall(r"\[process (\d)/2\] Stopped at step (\d+) after "
                       r"(SIGTERM|SIGINT)", output)
  assert sorted(stopped) == [("0", stopped[0][1], "SIGTERM"),
                             ("1", stopped[0][1], "SIGINT")], output[-3000:]
  assert checkpoint_steps(workdir)[-1] == int(stopped[0][1]) > step
  for i in (0, 1):
    assert f"[process {i}/2] Resumed from the checkpoint of step {step}." in (
        output)
    assert (f"[process {i}/2] Persistent compilation cache: "
            f"{tmp_path / 'jax_cache'}.") in output
  # Process 0 loads the entry its first start wrote; JAX's key differs
  # between CPU processes (docs/operations.md), so process 1 compiles.
  compiled = dict(re.findall(r"\[process (\d)/2\] Compiled the train step "
                             r"in [\d.]+ s(.*)\.$", output, re.M))
  assert compiled == {"0": " (a hit of the persistent compilation cache)",
                      "1": ""}, compiled
  assert exited < 10, exited


@pytest.mark.xdist_group("processes")  # see conftest
def test_multinode_processes_make_one_run(tmp_path, eight_device_run):
  """``launch/multinode.sh`` on each of two "nodes" (processes here, with 4
  CPU devices each; node0 is this machine)."""
  workdir = tmp_path / "run"
  port = fakes.free_port()
  env = environment(4)
  processes = []
  for process_id in (0, 1):
    command = docs.usage_line(
        r"launch/multinode\.sh .*", workdir,
        **{"node0:1234": f"localhost:{port}",
           "--process_id=0": f"--process_id={process_id}"}, **RECIPE)
    processes.append(subprocess.Popen(
        ["bash", *command, "--", *LAUNCHED],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True))
  outputs = [p.communicate(timeout=400)[0] for p in processes]
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output[-3000:]
  assert "[process 1/2] Process 1/2, 4 local / 8 global devices" in outputs[1]
  assert_same_state_as_eight_devices(eight_device_run[0], workdir)


# ------------------------------------------------------------------ --setup.


INSPECT = """
import importlib.metadata as m, importlib.util, sys

print(sys.version_info[:2] >= (3, 11), sys.prefix)
print(importlib.util.find_spec("eqco_jax").origin)
for name in ("eqco-jax", "jax", "jaxlib", "libtpu", "flax", "tensorflow-cpu",
             "orbax-checkpoint", "clu"):
  print(name, m.version(name))
"""


def test_tpu_pod_setup_makes_a_python_3_11_environment_with_uv(tmp_path):
  """``tpu_pod.sh --setup`` through the fake gcloud: the checkout reaches
  every worker; uv (on the image's PATH here) makes ~/eqco-jax/.venv from the
  local interpreter and installs '.[train]' and jax[tpu] from --wheels at
  constraints.txt's versions. Not here: uv's own installation and its Python
  download (no network), real libtpu."""
  usage = docs.usage_line(r"launch/tpu_pod\.sh --setup .*", "")
  env = fakes.fake_env(tmp_path, provision=False,
                       tpu_name=usage[2].split("=")[1],
                       zone=usage[3].split("=")[1])
  wheels = fakes.local_wheels(tmp_path / "wheels")
  result = run(["bash", *usage, f"--python={sys.base_prefix}/bin/python3.11",
                f"--wheels={wheels}"], env, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  key = lambda name: re.sub(r"[-_.]+", "-", name).lower()
  pins = {key(line.split("==")[0]): line.split("==")[1] for line in
          (pathlib.Path(ROOT) / "constraints.txt").read_text().splitlines()
          if "==" in line and not line.startswith("#")}
  for worker in (0, 1):
    home = fakes.worker_home(env, worker, usage[2].split("=")[1],
                             usage[3].split("=")[1])
    checkout = home / "eqco-jax"
    assert (checkout / "launch" / "tpu_pod.sh").is_file()
    assert not (checkout / ".git").exists()
    assert not (home / "eqco-jax.tar.gz").exists()
    inspect = run([str(checkout / ".venv" / "bin" / "python"), "-c", INSPECT],
                  {"PATH": "/usr/bin:/bin"}, cwd=home)
    assert inspect.returncode == 0, inspect.stderr
    lines = inspect.stdout.splitlines()
    assert lines[0] == f"True {checkout / '.venv'}"
    assert lines[1] == str(checkout / "eqco_jax" / "__init__.py")  # editable
    versions = dict(line.split() for line in lines[2:])
    assert versions["eqco-jax"] == "0.1.0"
    assert versions["libtpu"].startswith("0.0.")
    for name in ("jax", "jaxlib", "flax", "tensorflow-cpu", "clu",
                 "orbax-checkpoint"):
      assert versions[name] == pins[key(name)], name


# --------------------------------------------------- the fakes check arguments.


def test_fakes_reject_what_the_real_tools_reject(tmp_path):
  env = fakes.fake_env(tmp_path, project="fake-project")
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", fakes.TPU_NAME]
  bad = {
      "no --zone": [*ssh, "--worker=all", "--command=true"],
      "unknown flag": [*ssh, f"--zone={fakes.ZONE}", "--workers=all",
                       "--command=true"],
      "abbreviated flag": [*ssh, f"--zone={fakes.ZONE}", "--work=all",
                           "--command=true"],
      "unknown TPU": [*ssh[:-1], "other", f"--zone={fakes.ZONE}",
                      "--command=true"],
      "wrong project": [*ssh, f"--zone={fakes.ZONE}", "--project=other",
                        "--command=true"],
      "wrong zone": [*ssh, "--zone=europe-west4-a", "--command=true"],
      "no --command": [*ssh, f"--zone={fakes.ZONE}", "--worker=all"],
      "no such worker": [*ssh, f"--zone={fakes.ZONE}", "--worker=2",
                         "--command=true"],
      "unknown command": ["gcloud", "compute", "tpus", "tpu-vm", "exec"],
      "folder without --recurse": [
          "gcloud", "compute", "tpus", "tpu-vm", "scp", os.path.join(ROOT, "launch"),
          f"{fakes.TPU_NAME}:~/x", f"--zone={fakes.ZONE}", "--worker=all"],
      "sbatch: unknown option": ["sbatch", "--nodez=2", "launch/slurm.sbatch",
                                 "configs/quickstart.py:tiny", "w"],
      "sbatch: too many nodes": ["sbatch", "--nodes=3", "launch/slurm.sbatch",
                                 "configs/quickstart.py:tiny", "w"],
      "sbatch: too many GPUs": ["sbatch", "--gpus-per-node=8",
                                "launch/slurm.sbatch",
                                "configs/quickstart.py:tiny", "w"],
      "sbatch: no #! line": ["sbatch", "README.md"],
      "srun outside a job": ["srun", "true"],
      "tpu_pod.sh: --wheels without --setup": [
          "bash", "launch/tpu_pod.sh", *TPU, "--config=configs/quickstart.py:tiny",
          "--workdir=w", "--wheels=/tmp"],
  }
  for what, argv in bad.items():
    result = run(argv, env)
    assert result.returncode != 0, what
    assert "Traceback" not in result.stderr, (what, result.stderr)
  # Inside a job, srun checks its own options and the job's size.
  script = tmp_path / "job.sh"
  script.write_text("#!/bin/bash\nsrun --ntasks=3 true || echo ntasks=$?\n"
                    "srun --bogus true || echo bogus=$?\n"
                    "srun -n 2 bash -c 'echo task $SLURM_PROCID of "
                    "$SLURM_NTASKS on $SLURM_STEP_NODELIST'\n")
  job = run(["sbatch", "--nodes=2", f"--output={tmp_path}/job.out",
             str(script)], env)
  assert job.returncode == 0, job.stderr
  out = (tmp_path / "job.out").read_text()
  assert "ntasks=1" in out and "bogus=2" in out, out
  assert sorted(re.findall(r"task \d of 2 on localhost,localhost", out)) == [
      "task 0 of 2 on localhost,localhost",
      "task 1 of 2 on localhost,localhost"], out

