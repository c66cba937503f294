"""eqco_jax.program.commands.distributed: what a process asks of
``jax.distributed.initialize`` in each environment, and a taken coordinator
port said in one sentence before JAX sees it."""

from __future__ import annotations

import os
import socket
import types

import jax
import pytest

import fakes
from eqco_jax.core.errors import UserError
from eqco_jax.program.commands import distributed


def _flags() -> types.SimpleNamespace:
  """The distributed flags as a command line without them leaves them."""
  return types.SimpleNamespace(coordinator_address=None, num_processes=None,
                               process_id=None, cpu_collectives="gloo")


@pytest.mark.parametrize("environ, calls", [
    # JAX's own detection first; an srun task keeps all its GPUs.
    ({"SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
      "CUDA_VISIBLE_DEVICES": "0,1,2,3"},
     [{"local_device_ids": [0, 1, 2, 3]}]),
    ({"SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
      "CUDA_VISIBLE_DEVICES": "3"}, [{"local_device_ids": [0]}]),
    ({"SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2"}, [{}]),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, [{}]),
    # Where JAX finds no cluster: a pod's variables without TPU chips (the
    # fake pod), at JAX's TPU port; else one process.
    ({"TPU_WORKER_HOSTNAMES": "h0,h1", "TPU_WORKER_ID": "1"},
     [{}, {"coordinator_address": "h0:8482", "num_processes": 2,
           "process_id": 1}]),
    ({"TPU_WORKER_HOSTNAMES": "h0,h1", "TPU_WORKER_ID": "0",
      "JAX_COORDINATOR_PORT": "1234"},
     [{}, {"coordinator_address": "h0:1234", "num_processes": 2,
           "process_id": 0}]),
    ({"TPU_WORKER_HOSTNAMES": "h0", "TPU_WORKER_ID": "0"}, [{}]),
    ({}, [{}]),
])
def test_main_initialises_jax_distributed_from_the_environment(
    monkeypatch, environ, calls):
  """What eqco_jax.main asks of ``jax.distributed.initialize``; a call
  without a coordinator stands for JAX's detection, which finds a cluster
  here exactly when the environment names one (SLURM, the coordinator
  variable)."""
  for name in list(os.environ):
    if name.startswith(("SLURM_", "TPU_", "OMPI_", "JAX_COORDINATOR",
                        "CUDA_VISIBLE", "KUBERNETES")):
      monkeypatch.delenv(name)
  for name, value in environ.items():
    monkeypatch.setenv(name, value)
  recorded = []

  def initialize(**kwargs):
    recorded.append(kwargs)
    detected = "SLURM_STEP_NODELIST" in os.environ or (
        "JAX_COORDINATOR_ADDRESS" in os.environ)
    if "coordinator_address" not in kwargs and not detected:
      raise ValueError("coordinator_address should be defined.")

  monkeypatch.setattr(jax.distributed, "initialize", initialize)
  monkeypatch.setattr(jax.config, "update", lambda *args: None)
  distributed.initialize(_flags())
  assert recorded == calls


@pytest.mark.parametrize("how", ["flags", "tpu environment"])
def test_a_taken_coordinator_port_is_one_sentence(monkeypatch, how):
  """Process 0 whose coordinator port is taken stops before JAX, which would
  crash on it (a segmentation fault in jax 0.10)."""
  port = fakes.free_port()
  args = _flags()
  for name in list(os.environ):
    if name.startswith(("SLURM_", "TPU_", "JAX_COORDINATOR")):
      monkeypatch.delenv(name)
  if how == "flags":
    args.coordinator_address = f"localhost:{port}"
    args.num_processes, args.process_id = 2, 0
  else:
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost,localhost")
    monkeypatch.setenv("TPU_WORKER_ID", "0")
    monkeypatch.setenv("JAX_COORDINATOR_PORT", str(port))

  def initialize(**kwargs):  # JAX's detection finds no cluster here.
    if kwargs:
      pytest.fail(f"initialize({kwargs}) with the port taken")
    raise ValueError("coordinator_address should be defined.")

  monkeypatch.setattr(jax.distributed, "initialize", initialize)
  monkeypatch.setattr(jax.config, "update", lambda *args: None)
  with socket.create_server(("127.0.0.1", port)):
    with pytest.raises(UserError) as error:
      distributed.initialize(args)
  assert str(error.value) == (
      f"Port {port} of this host, where process 0 serves the coordinator of "
      "a multi-process run, is in use (by an earlier run still alive?); stop "
      "that process or choose another port (coordinator address "
      f"localhost:{port}).")
