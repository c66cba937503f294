"""One writer per workdir: the lease a run holds in its workdir.

Process 0 of a run takes ``lease.json`` in the workdir (local or ``gs://``)
before anything is written there, renews it every ``RENEW_SECS`` from a
background thread, and gives it back when the run ends. Another run started
on the same workdir while the first is alive stops with one sentence naming
the holder (host, pid, since when) and writes nothing:

* immediately, when the holder is a live process of this machine, or the
  lease is being renewed;
* after at most ``LEASE_SECS`` otherwise, the time a holder on another
  machine has to renew its lease; a lease left so long unrenewed is a killed
  run's, and the new run takes it over. A killed run of this machine (its
  pid gone) is taken over at once.

Two runs that start together both write their lease, wait ``SETTLE_SECS``
(longer than a write takes) and read it back: only the one that reads its own token goes on. This is
what turns hosts that did not join one cluster (each process 0 of 1) into a
clear error instead of N copies training into one workdir.
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
import time
import uuid
from typing import Any

from absl import logging

from eqco_jax.core.errors import UserError
from eqco_jax.program.files import storage
from eqco_jax.program.files.workdir import Workdir

LEASE_SECS = 60.0  # a lease not renewed for this long is abandoned
RENEW_SECS = 15.0  # how often the holder renews it
# How long a new holder waits before reading its lease back: longer than a
# write takes, on a local disk and on object storage.
SETTLE_SECS = {"local": 0.2, "url": 2.0}
_POLL_SECS = 2.0


class WorkdirInUse(UserError):
  """Another live run holds the workdir's lease."""


def _alive_here(holder: dict[str, Any]) -> bool | None:
  """Whether the holder's process is alive, if it ran on this machine (a
  holder with this process's own pid is an earlier incarnation of it);
  None when it runs elsewhere."""
  if holder.get("host") != socket.gethostname():
    return None
  try:
    pid = int(holder["pid"])
  except (KeyError, TypeError, ValueError):
    return False
  if pid == os.getpid():
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _refusal(location: str, holder: dict[str, Any]) -> WorkdirInUse:
  since = datetime.datetime.fromtimestamp(
      holder["since"], datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
  return WorkdirInUse(
      f"the workdir {location} is in use by the run of pid {holder['pid']} "
      f"on {holder['host']}, which has held it since {since} UTC; wait for "
      "it to end (or stop it) and run the same command again, or choose "
      "another --workdir.")


class Lease:
  """The workdir's lease, held from :meth:`take` to :meth:`release`."""

  def __init__(self, workdir: Workdir):
    self.location = workdir.location
    self.path = workdir.lease_file
    self.token = uuid.uuid4().hex
    self.since = time.time()
    self._stop = threading.Event()
    self._renewer: threading.Thread | None = None

  def _record(self) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": self.since, "renewed": time.time(),
            "token": self.token}

  def _read(self) -> dict[str, Any] | None:
    try:
      return storage.read_json(self.path)
    except ValueError:  # half of one (not written by this code): none
      return None

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
    """Returns once a holder on another machine has not renewed its lease
    for ``LEASE_SECS`` (by this machine's clock: the two clocks may differ);
    raises WorkdirInUse as soon as it renews it."""
    if time.time() - holder.get("renewed", 0.0) > 2 * LEASE_SECS:
      return  # abandoned long ago, whatever the clocks say
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
        holder = self._read()
        if holder is not None and holder.get("token") != self.token:
          logging.error("The lease of %s was taken by pid %s on %s.",
                        self.location, holder.get("pid"), holder.get("host"))
          return
        storage.write_json_atomic(self.path, self._record())
      except Exception as error:  # pylint: disable=broad-except
        logging.warning("Could not renew the lease of %s: %s", self.location,
                        error)

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
