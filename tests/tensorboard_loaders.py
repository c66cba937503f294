"""What TensorBoard shows of a log directory, through its own loaders: a
live server as a user starts it (``tensorboard --logdir=DIR`` on localhost,
its default loader, the data server) read through its HTTP API, and the
Python loader that ``--load_fast=false`` serves (the multiplexer and its
data provider)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Iterator

from tensorboard import context
from tensorboard.backend.event_processing import data_provider
from tensorboard.backend.event_processing import plugin_event_multiplexer
from tensorboard.data import provider

# What TensorBoard prints when its default loader is the data server (the
# Rust one of the tensorboard-data-server package), not the Python one.
DATA_SERVER_NOTE = "Using experimental fast data loading logic"

Points = list[tuple[int, float]]


@contextlib.contextmanager
def serving(logdir, log_path) -> Iterator[Callable[[str], Points]]:
  """``tensorboard --logdir=logdir`` on a free localhost port (rereading
  the directory every second rather than 5: not a loader setting), its
  output in ``log_path``; yields ``scalars(tag)``, the ``(step, value)``
  points of the root run's ``tag`` that the server shows now."""
  binary = os.path.join(os.path.dirname(sys.executable), "tensorboard")
  with open(log_path, "a+") as log:  # appended: reads move no write
    server = subprocess.Popen(
        [binary, f"--logdir={logdir}", "--host=localhost", "--port=0",
         "--reload_interval=1"], stdout=log, stderr=subprocess.STDOUT)
    try:
      base = _address(server, log)

      def scalars(tag: str) -> Points:
        query = urllib.parse.urlencode({"run": ".", "tag": tag})
        try:
          with urllib.request.urlopen(
              f"{base}/data/plugin/scalars/scalars?{query}",
              timeout=10) as response:
            return [(step, value) for _, step, value in json.load(response)]
        except urllib.error.HTTPError:  # no such run or tag yet
          return []

      yield scalars
      log.seek(0)
      assert DATA_SERVER_NOTE in log.read(), "not TensorBoard's data server"
    finally:
      # At once: its data server exits when its input closes (it runs with
      # --die-after-stdin), and TensorBoard's own exit takes seconds.
      server.kill()
      server.wait(timeout=30)


def _address(server: subprocess.Popen, log) -> str:
  """The server's base URL, from the line it prints once serving."""
  deadline = time.time() + 120
  while time.time() < deadline:
    log.seek(0)
    found = re.search(r"at (http://localhost:\d+)/", log.read())
    if found:
      return found.group(1)
    assert server.poll() is None, "TensorBoard stopped"
    time.sleep(0.1)
  raise AssertionError("TensorBoard did not start in 2 minutes")


def wait_for(scalars: Callable[[str], Points], tag: str, expected: Points,
             timeout: float = 60) -> Points:
  """Polls ``scalars(tag)`` until it equals ``expected`` (or the timeout);
  returns the last answer."""
  deadline = time.time() + timeout
  shown = scalars(tag)
  while shown != expected and time.time() < deadline:
    time.sleep(0.2)
    shown = scalars(tag)
  return shown


def python_loader_scalars(logdir, tag: str) -> Points:
  """The ``(step, value)`` points of the root run's ``tag`` that
  ``tensorboard --load_fast=false --logdir=logdir`` serves."""
  served = data_provider.MultiplexerDataProvider(_multiplexer(logdir),
                                                 str(logdir))
  (points,) = served.read_scalars(
      context.RequestContext(), experiment_id="", plugin_name="scalars",
      downsample=10**6, run_tag_filter=provider.RunTagFilter(
          runs=["."], tags=[tag]))["."].values()
  return [(p.step, p.value) for p in points]


def python_loader_hparams(logdir) -> int:
  """How many hyperparameter records of the root run that loader keeps."""
  return len(_multiplexer(logdir).Tensors(".", "_hparams_/session_start_info"))


def _multiplexer(logdir) -> plugin_event_multiplexer.EventMultiplexer:
  multiplexer = plugin_event_multiplexer.EventMultiplexer()
  multiplexer.AddRunsFromDirectory(str(logdir))
  multiplexer.Reload()
  return multiplexer
