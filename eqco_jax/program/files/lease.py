"""One writer per workdir: the lease a run holds in its workdir.

Process 0 of a run takes ``lease.json`` in the workdir (local or ``gs://``)
before anything is written there, renews it every ``RENEW_SECS`` from a
background thread, and gives it back when the run ends. The lease names its
holder: host, pid and, where ``/proc`` tells them (Linux), the machine's boot
id, the pid namespace (a container's own) and the process's start time, so
that a pid reused after a reboot or a container's restart is no holder.
Another run started on the same workdir while the first is alive stops with
one sentence naming the holder (host, pid, since when) and writes nothing:

* immediately, when the holder is a live process of this machine (the same
  boot, pid namespace, pid and start time; where ``/proc`` is missing, a
  live process with that pid), or the lease is being renewed;
* after at most ``LEASE_SECS`` otherwise (a holder on another machine, in
  another container or before a reboot of this one), the time a live holder
  has to renew its lease, said in one line while it waits; a lease left so
  long unrenewed is a killed run's, and the new run takes it over. A killed
  run of this machine (its process gone) is taken over at once.

Two runs that start together both write their lease, wait ``SETTLE_SECS``
(longer than a write takes) and read it back: only the one that reads its
own token goes on. This is what turns hosts that did not join one cluster
(each process 0 of 1) into a clear error instead of N copies training into
one workdir.

A run whose lease was taken over (it looked abandoned: a run stopped or cut
off for longer than ``LEASE_SECS``) stops at its next checkpoint without
saving it, with one sentence (:func:`check_held`, asked by each save). In a
multi-process run only process 0 holds the lease; the other processes learn
its outcome, a refusal or a lease taken over, from JAX's coordination
service and stop at the same point with the same sentence
(:class:`Holding`).
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

from absl import logging

from eqco_jax.core.errors import UserError, one_line
from eqco_jax.program.files import storage
from eqco_jax.program.files.workdir import Workdir

LEASE_SECS = 60.0  # a lease not renewed for this long is abandoned
RENEW_SECS = 15.0  # how often the holder renews it
# How long a new holder waits before reading its lease back: longer than a
# write takes, on a local disk and on object storage.
SETTLE_SECS = {"local": 0.2, "url": 2.0}
_POLL_SECS = 2.0
# How long the other processes of a run wait for process 0's word on the
# lease: longer than taking it can last (LEASE_SECS and slow storage).
_WORD_TIMEOUT_SECS = 1800


class WorkdirInUse(UserError):
  """Another live run holds the workdir's lease."""


class LeaseTaken(UserError):
  """Another run took this run's lease over."""


# ----------------------------------------------------- who holds a lease.
def _started(pid: int) -> int | None:
  """Process ``pid``'s start time, in clock ticks since boot (field 22 of
  ``/proc/PID/stat``); None if there is no such process (or no /proc), or
  only its exit status is left (a zombie)."""
  stat = storage.local_text(f"/proc/{pid}/stat")
  if stat is None:
    return None
  # Field 2, the command, may hold spaces and parentheses: count from after
  # its closing one (field 3, the state).
  fields = stat.rsplit(")", 1)[1].split()
  return None if fields[0] == "Z" else int(fields[19])


def _pid_namespace() -> str | None:
  try:
    return os.readlink("/proc/self/ns/pid")
  except OSError:
    return None


def identity() -> dict[str, Any]:
  """What tells this process from every other that had or will have its
  pid: host, pid, and where /proc gives them ``boot_id``, ``pid_namespace``
  and ``started``."""
  found = {"boot_id": storage.local_text("/proc/sys/kernel/random/boot_id"),
           "pid_namespace": _pid_namespace(),
           "started": _started(os.getpid())}
  return {"host": socket.gethostname(), "pid": os.getpid(),
          **{k: v for k, v in found.items() if v is not None}}


def _alive_here(holder: dict[str, Any]) -> bool | None:
  """Whether the holder's process is alive, if this process can tell (the
  same host, boot and pid namespace; a holder with this process's own pid
  is an earlier incarnation of it); None when it cannot (another machine,
  container or boot)."""
  mine = identity()
  if holder.get("host") != mine["host"] or any(
      key in holder and key in mine and holder[key] != mine[key]
      for key in ("boot_id", "pid_namespace")):
    return None
  try:
    pid = int(holder["pid"])
  except (KeyError, TypeError, ValueError):
    return False
  if pid == mine["pid"]:
    return False
  if "started" in holder and "started" in mine:
    return _started(pid) == holder["started"]  # else the pid was reused
  try:  # No /proc (macOS): whether any process has that pid.
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _utc(seconds: float) -> str:
  return datetime.datetime.fromtimestamp(
      seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _refusal(location: str, holder: dict[str, Any]) -> WorkdirInUse:
  return WorkdirInUse(
      f"the workdir {location} is in use by the run of pid {holder['pid']} "
      f"on {holder['host']}, which has held it since "
      f"{_utc(holder['since'])} UTC; wait for it to end (or stop it) and run "
      "the same command again, or choose another --workdir.")


def _taken(location: str, holder: dict[str, Any], step: int) -> LeaseTaken:
  return LeaseTaken(
      f"the workdir {location} was taken over by the run of pid "
      f"{holder.get('pid')} on {holder.get('host')} at "
      f"{_utc(holder.get('since', 0.0))} UTC, which found this run's lease "
      f"unrenewed for {LEASE_SECS:.0f} s; this run stopped at step {step} "
      "without saving it, leaving the workdir to that run: run the same "
      "command again once that run has ended (it resumes from the newest "
      "checkpoint), or choose another --workdir.")


# ------------------------------------------------------------- the lease.
class Lease:
  """The workdir's lease, held from :meth:`take` to :meth:`release`."""

  def __init__(self, workdir: Workdir):
    self.location = workdir.location
    self.path = workdir.lease_file
    self.token = uuid.uuid4().hex
    self.since = time.time()
    # The record of the run that took the lease over, once one did.
    self.taken_by: dict[str, Any] | None = None
    self._stop = threading.Event()
    self._renewer: threading.Thread | None = None

  def _record(self) -> dict[str, Any]:
    return {**identity(), "since": self.since, "renewed": time.time(),
            "token": self.token}

  def _read(self) -> dict[str, Any] | None:
    """The lease's record; None if there is none.

    Raises:
      UserError: ``lease.json`` cannot be read (a directory, unreadable).
    """
    try:
      return storage.read_json(self.path)
    except storage.DamagedFile:  # half of one (not written by this code)
      return None
    except OSError as error:
      raise UserError(
          f"cannot read the lease file {self.path} of the workdir "
          f"{self.location} ({one_line(error)}); it is a small JSON file "
          "this program writes while a run holds the workdir: remove it "
          "(or make it readable) and run the same command again.") from None

  def take(self) -> Lease:
    """Takes the lease, or raises WorkdirInUse (see the module's doc)."""
    holder = self._read()
    if holder is not None:
      alive = _alive_here(holder)
      if alive:
        raise _refusal(self.location, holder)
      if alive is None:
        self._wait_for_silence(holder)
      logging.warning("Taking over the lease of %s from pid %s on %s, which "
                      "no longer holds it.", self.location, holder.get("pid"),
                      holder.get("host"))
    storage.write_json_atomic(self.path, self._record())
    # A run that started with this one wrote its lease too: one remains.
    time.sleep(SETTLE_SECS["url" if storage.is_url(self.path) else "local"])
    holder = self._read()
    if holder is None or holder.get("token") != self.token:
      raise _refusal(self.location, holder or {
          "pid": "?", "host": "?", "since": time.time()})
    self._renewer = threading.Thread(target=self._renew, daemon=True,
                                     name="workdir-lease")
    self._renewer.start()
    return self

  def _wait_for_silence(self, holder: dict[str, Any]) -> None:
    """Returns once a holder this machine cannot ask about has not renewed
    its lease for ``LEASE_SECS`` (by this machine's clock: the two clocks
    may differ); raises WorkdirInUse as soon as it renews it."""
    silent_for = time.time() - holder.get("renewed", 0.0)
    if silent_for > 2 * LEASE_SECS:
      return  # abandoned long ago, whatever the clocks say
    logging.warning(
        "The workdir %s is held by pid %s on %s (renewed %.0f s ago by that "
        "host's clock), which this machine cannot check: waiting up to %.0f "
        "s for it to renew its lease (then this run stops) or stay silent "
        "(then this run takes the workdir over).", self.location,
        holder.get("pid"), holder.get("host"), max(silent_for, 0.0),
        LEASE_SECS)
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < LEASE_SECS:
      time.sleep(_POLL_SECS)
      latest = self._read()
      if latest is None:
        return  # given back
      if (latest.get("token"), latest.get("renewed")) != (
          holder.get("token"), holder.get("renewed")):
        raise _refusal(self.location, latest)

  def _renew(self) -> None:
    while not self._stop.wait(RENEW_SECS):
      try:
        if self.taken_over() is not None:
          logging.error("The lease of %s was taken over by pid %s on %s; "
                        "this run stops at its next checkpoint, without "
                        "saving it.", self.location, self.taken_by.get("pid"),
                        self.taken_by.get("host"))
          return
        storage.write_json_atomic(self.path, self._record())
      except Exception as error:  # pylint: disable=broad-except
        logging.warning("Could not renew the lease of %s: %s", self.location,
                        error)

  def taken_over(self) -> dict[str, Any] | None:
    """The record of the run that took the lease over from this one (read
    now), or None while it is this run's.

    Raises:
      UserError: the lease cannot be read.
    """
    if self.taken_by is None:
      holder = self._read()
      if holder is not None and holder.get("token") != self.token:
        self.taken_by = holder
    return self.taken_by

  def release(self) -> None:
    """Gives the lease back (if it is still this run's)."""
    self._stop.set()
    if self._renewer is not None:
      self._renewer.join()
    try:
      holder = self._read()
      if holder is not None and holder.get("token") == self.token:
        self.path.unlink()
    except Exception as error:  # pylint: disable=broad-except
      logging.warning("Could not give back the lease of %s: %s",
                      self.location, error)

  def __enter__(self) -> Lease:
    return self.take()

  def __exit__(self, *exc) -> None:
    self.release()


# ------------------------------------------------ every process of a run.
def on_every_process(name: str, act: Callable[[], None]) -> None:
  """Runs ``act`` on process 0; where it raises a UserError, every process
  of the run raises one with the same sentence.

  The others wait for process 0's word under a key named after ``name`` in
  the key-value store of JAX's coordination service (``jax.distributed``);
  ``name`` is new at each call.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    act()
    return
  from orbax.checkpoint import multihost  # pylint: disable=g-import-not-at-top
  client = multihost.get_jax_distributed_client()
  key = f"eqco_jax:lease/{name}"
  if jax.process_index() > 0:
    word = client.blocking_key_value_get(key, _WORD_TIMEOUT_SECS * 1000)
    if word:
      raise UserError(word)
    return
  try:
    act()
  except UserError as error:
    client.key_value_set(key, str(error))
    raise
  except Exception:
    client.key_value_set(key, "process 0 of this run failed (its log says "
                         "why); the other processes stop with it.")
    raise
  client.key_value_set(key, "")


_held: Holding | None = None  # what check_held asks: one lease a process


class Holding:
  """A context manager: this process's part in the lease of a run's
  workdir. Process 0 takes the :class:`Lease` (and gives it back on exit);
  a refusal raises the same one-sentence UserError on every process.
  Inside, :func:`check_held` asks whether it is still the run's."""

  def __init__(self, workdir: Workdir):
    self.workdir = workdir
    self.lease: Lease | None = None
    self._checks = 0

  def __enter__(self) -> Holding:
    global _held
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_index() == 0:
      self.lease = Lease(self.workdir)
    on_every_process("take", lambda: self.lease.take())
    _held = self
    return self

  def __exit__(self, *exc) -> None:
    global _held
    _held = None
    if self.lease is not None:
      self.lease.release()

  def check(self, step: int) -> None:
    """Raises LeaseTaken on every process, at the same ``step``, once
    another run took the lease over (process 0 reads it)."""
    self._checks += 1

    def check_lease() -> None:
      try:
        holder = self.lease.taken_over()
      except Exception as error:  # pylint: disable=broad-except
        # As a failed renewal: a storage hiccup stops no run; the next
        # check reads the lease again.
        logging.warning("Could not check the lease of %s: %s",
                        self.lease.location, error)
        return
      if holder is not None:
        raise _taken(self.lease.location, holder, step)

    on_every_process(f"check_{self._checks}_step_{step}", check_lease)


def check_held(step: int) -> None:
  """Raises :class:`LeaseTaken` (on every process of the run, at the same
  ``step``) once another run took over the lease this process's run holds;
  nothing where it holds none (a program that writes no lease, a test).
  Every process asks at the same points: before each checkpoint save."""
  if _held is not None:
    _held.check(step)
