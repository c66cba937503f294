"""How long a preemption notice takes to stop a two-process run at the
shipped cadence: SIGTERM to one process, every process saved and exited.

  python -m benchmarks.preemption [--config=configs/quickstart.py]
      [--config.FIELD=VALUE ...] [--trials=10] [--runs_dir=DIR]

Each trial starts ``launch/local_processes.sh`` (2 processes x 4 CPU
devices) on the config with its shipped checkpoint and log cadence, in a
new workdir under ``--runs_dir`` (so every trial but the first loads the
train step from the compilation cache beside them), waits until both
processes have compiled the train step, lets them train for a random 3-8 s
(``--train_seconds``),
sends SIGTERM to process 1 and times the exit of both. A trial passes when
both saved the same step, the launcher exited 0 and both processes were
gone within 10 s of the signal. The step time is read from the processes'
own log lines (steps trained between the compile and the notice). One JSON
line per trial, then one with the distribution.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from absl import flags
from ml_collections import config_flags

from eqco_jax.program.commands import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE_SECS = 10.0
LINE_TIME = re.compile(r"^[IWE](\d\d)(\d\d) (\d\d):(\d\d):([\d.]+) ")


def define_flags(flag_values: flags.FlagValues) -> None:
  """The benchmark's flags, on ``flag_values``."""
  define = dict(flag_values=flag_values)
  config_flags.DEFINE_config_file(
      "config", os.path.join(ROOT, "configs", "quickstart.py"),
      "The recipe to stop: FILE.py[:VARIANT]; its --config.FIELD=VALUE "
      "overrides are checked here and passed on.", lock_config=True,
      **define)
  flags.DEFINE_integer("trials", 10, "Trials (SIGTERMs).", **define)
  flags.DEFINE_list("train_seconds", ["3", "8"], "The SIGTERM comes this long "
                    "after both processes compiled: uniform in [MIN, MAX].",
                    **define)
  flags.DEFINE_string("runs_dir", None, "Where the trials' workdirs go "
                      "(default: a new temporary folder).", **define)


def _log_time(line: str) -> float | None:
  """The time of day an absl log line was written, as a Unix time."""
  match = LINE_TIME.match(line)
  if not match:
    return None
  month, day, hour, minute, second = match.groups()
  now = datetime.datetime.now()
  start = datetime.datetime(now.year, int(month), int(day), int(hour),
                            int(minute))
  return start.timestamp() + float(second)


def _python_pid(workdir: str, process: int) -> int | None:
  """The pid of ``eqco_jax.main`` process ``process`` of the run in
  ``workdir`` (None: not running)."""
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    except OSError:
      continue
    if (b"eqco_jax.main" in argv and f"--workdir={workdir}".encode() in argv
        and f"--process_id={process}".encode() in argv):
      return int(entry)
  return None


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split()[2] != "Z"
  except OSError:
    return False


def _logs(workdir: str) -> list[str]:
  logs = []
  for i in (0, 1):
    try:
      with open(os.path.join(workdir, f"process_{i}.log")) as f:
        logs.append(f.read())
    except OSError:
      logs.append("")
  return logs


def trial(config: str, overrides: list[str], workdir: str,
          train_seconds: tuple[float, float]) -> dict:
  """One SIGTERM to process 1 of a fresh two-process run; its figures."""
  command = ["bash", "launch/local_processes.sh", "--num_processes=2",
             "--devices_per_process=4", f"--config={config}",
             f"--workdir={workdir}", "--", *overrides]
  launcher = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while not all("Compiled the train step" in log for log in _logs(workdir)):
    if launcher.poll() is not None or time.time() > deadline:
      raise RuntimeError("the run ended or hung before both processes "
                         "compiled: " + _logs(workdir)[0][-2000:])
    time.sleep(0.2)
  time.sleep(random.uniform(*train_seconds))
  pids = [_python_pid(workdir, i) for i in (0, 1)]
  sent = time.time()
  os.kill(pids[1], signal.SIGTERM)
  while any(pid and _alive(pid) for pid in pids):
    time.sleep(0.02)
  exited = time.time() - sent
  launcher.wait(timeout=60)
  logs = _logs(workdir)
  stopped = [re.search(r"^(.*)Stopped at step (\d+) after SIGTERM", log, re.M)
             for log in logs]
  compiled = [re.search(r"^(.*)Compiled the train step", log, re.M)
              for log in logs]
  steps = [int(m.group(2)) if m else None for m in stopped]
  saved = [_log_time(m.group(1)) - sent if m else None for m in stopped]
  # The steps trained between the compile and the notice's step (the save
  # after it is not a step).
  noticed = re.search(r"^(.*)Preemption notice: every process saves step "
                      r"(\d+)", logs[0], re.M)
  step_seconds = None
  if noticed and compiled[0] and int(noticed.group(2)):
    step_seconds = ((_log_time(noticed.group(1)) -
                     _log_time(compiled[0].group(1))) / int(noticed.group(2)))
  return {
      "launcher_status": launcher.returncode,
      "stopped_steps": steps,
      "saved_after_s": [round(s, 2) if s is not None else None
                        for s in saved],
      "exited_after_s": round(exited, 2),
      "step_seconds": round(step_seconds, 3) if step_seconds else None,
      "passed": (launcher.returncode == 0 and steps[0] is not None
                 and steps[0] == steps[1] and exited < DEADLINE_SECS)}


def main(args: flags.FlagValues) -> None:
  runs_dir = args.runs_dir or tempfile.mkdtemp(prefix="preemption_")
  # The config as typed (file and overrides), for the program's processes.
  config = config_flags.get_config_filename(args["config"])
  overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
  results = []
  for number in range(args.trials):
    workdir = os.path.abspath(os.path.join(runs_dir, f"trial_{number}"))
    result = {"trial": number, **trial(config, overrides, workdir,
                                      tuple(map(float, args.train_seconds)))}
    results.append(result)
    print(json.dumps(result), flush=True)
  exits = sorted(r["exited_after_s"] for r in results)
  steps = [r["step_seconds"] for r in results if r["step_seconds"]]
  print(json.dumps({
      "trials": len(results),
      "passed": sum(r["passed"] for r in results),
      "exited_after_s": {"min": exits[0], "median": statistics.median(exits),
                         "max": exits[-1]},
      "step_seconds_median": (round(statistics.median(steps), 3)
                              if steps else None)}))


if __name__ == "__main__":
  cli.run(main, define_flags)
