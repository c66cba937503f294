"""What the fake gcloud, sbatch and srun share: starting N local processes as
if on N machines, and stopping the rest when one fails.

Standard library only: the fakes run under whichever ``python3`` is on PATH.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import socket
import subprocess
import sys
import time


def _ephemeral_low() -> int:
  """The lowest port the kernel hands out to outgoing connections."""
  try:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
      return int(f.read().split()[0])
  except (OSError, ValueError, IndexError):
    return 32768


def free_port(low: int = 20000, high: int | None = None) -> int:
  """A TCP port in ``[low, high]`` that nothing listens on now, on any
  address (JAX's coordinator binds ``[::]``).

  ``high`` defaults to just below the kernel's ephemeral range: a port from
  that range can be taken, between this check and the coordinator's bind, as
  the local end of any process's outgoing connection.
  """
  high = _ephemeral_low() - 1 if high is None else high
  rng = random.Random(os.getpid() ^ int(time.time() * 1e6))
  for _ in range(200):
    port = rng.randint(low, high)
    if _free_on_any_address(port):
      return port
  raise RuntimeError(f"no free port in [{low}, {high}]")


def _free_on_any_address(port: int) -> bool:
  families = [(socket.AF_INET, "0.0.0.0")]
  if socket.has_ipv6:
    families.append((socket.AF_INET6, "::"))
  for family, host in families:
    with socket.socket(family) as s:
      try:
        s.bind((host, port))
      except OSError as e:
        if family == socket.AF_INET6 and e.errno == errno.EADDRNOTAVAIL:
          continue  # no IPv6 on this host
        return False
  return True


def worker_xla_flags(env: dict[str, str], devices: int) -> str:
  """A worker's XLA_FLAGS: the test suite's own ($FAKE_XLA_FLAGS), then
  ``devices`` host CPU devices standing in for its accelerators."""
  return " ".join([*env.get("FAKE_XLA_FLAGS", "").split(),
                   f"--xla_force_host_platform_device_count={devices}"])


def exit_status(returncode: int) -> int:
  """A child's status as a shell reports it: 128 + N for signal N."""
  return 128 - returncode if returncode < 0 else returncode


def supervise(tasks: list[tuple[list[str], dict[str, str], str]], name: str,
              stop_others_on_failure: bool, grace_s: float = 5.0,
              stdout=None, stderr=None) -> int:
  """Runs ``(argv, env, cwd)`` tasks at once, each in its own session.

  When one fails and ``stop_others_on_failure``, the others' process groups
  get SIGTERM, then SIGKILL ``grace_s`` later. A SIGTERM or SIGINT to this
  process is passed on the same way. Returns the first failure's status
  (0 if all succeeded). ``stdout``/``stderr``: files for every task.
  """
  procs = [subprocess.Popen(argv, env=env, cwd=cwd, start_new_session=True,
                            stdout=stdout, stderr=stderr)
           for argv, env, cwd in tasks]
  stop_at: list[float] = []

  def stop(signum=signal.SIGTERM) -> None:
    for p in procs:
      if p.poll() is None:
        try:
          os.killpg(p.pid, signum)
        except ProcessLookupError:
          pass

  def on_signal(signum, frame) -> None:
    del frame
    stop(signum)
    if not stop_at:
      stop_at.append(time.time() + grace_s)

  signal.signal(signal.SIGTERM, on_signal)
  signal.signal(signal.SIGINT, on_signal)
  status, reported = 0, set()
  while any(p.poll() is None for p in procs):
    time.sleep(0.2)
    for i, p in enumerate(procs):
      code = p.poll()
      if code is None or i in reported:
        continue
      reported.add(i)
      if code != 0:
        print(f"{name}: task {i} exited with status {exit_status(code)}",
              file=sys.stderr, flush=True)
        if status == 0:
          status = exit_status(code)
          if stop_others_on_failure and not stop_at:
            print(f"{name}: stopping the other tasks", file=sys.stderr,
                  flush=True)
            stop()
            stop_at.append(time.time() + grace_s)
    if stop_at and time.time() > stop_at[0]:
      stop(signal.SIGKILL)
  for i, p in enumerate(procs):
    if p.returncode != 0 and status == 0:
      status = exit_status(p.returncode)
  return status


def fail(tool: str, message: str, code: int = 2) -> None:
  """Exits the way a command line tool rejects its arguments."""
  print(f"{tool}: error: {message}", file=sys.stderr)
  sys.exit(code)
