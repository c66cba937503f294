"""Joining a multi-process run: ``jax.distributed.initialize`` from the
flags, or from the cluster JAX detects (Cloud TPU, SLURM, Open MPI,
Kubernetes), and the check that process 0 can serve the coordinator."""

from __future__ import annotations

import errno
import os
import socket

from absl import app
from absl import flags

from eqco_jax.core.errors import UserError


def define_flags(flag_values: flags.FlagValues) -> None:
  """The flags of a multi-process run, on ``flag_values``."""
  define = dict(flag_values=flag_values)
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0, for multi-process runs.",
                      **define)
  flags.DEFINE_integer("num_processes", None,
                       "Processes in a multi-process run.", **define)
  flags.DEFINE_integer("process_id", None, "This process's index, 0-based.",
                       **define)
  flags.DEFINE_string("cpu_collectives", "gloo",
                      "CPU collectives for multi-process CPU runs "
                      "(gloo|mpi).", **define)


def initialize(args: flags.FlagValues) -> None:
  """``jax.distributed.initialize`` wherever this run spans several processes.

  Explicit flags win. Otherwise JAX detects the cluster itself: a Cloud TPU
  pod (its metadata server, or GKE's variables), SLURM (an ``srun`` task's
  ``SLURM_*``), Open MPI, Kubernetes, or ``JAX_COORDINATOR_ADDRESS`` with the
  process count and id; where it finds none, the run is one process. Two
  additions:

  * SLURM with one task per node driving several GPUs: JAX would make only
    GPU number ``SLURM_LOCALID`` visible; every GPU SLURM gave the task stays.
  * ``TPU_WORKER_HOSTNAMES`` and ``TPU_WORKER_ID`` where JAX finds no TPU
    chips and so no pod: the coordinator is the first host at
    ``JAX_COORDINATOR_PORT`` (8482, JAX's TPU default), one process per host.
    This is how ``tests/fakes/bin/gcloud`` runs a pod slice's workers on CPU.

  Hosts that should have joined one cluster but each run alone would write
  one workdir together; its lease (``files.lease``) refuses all but the first.
  Where this process is to serve the coordinator at a port that is taken,
  a UserError says so (JAX would crash on it).
  """
  import jax  # After absl parsed flags: nothing touches devices before.

  env = os.environ
  if args.num_processes and args.num_processes > 1 and (
      args.coordinator_address is None):
    raise app.UsageError(
        "--num_processes > 1 needs --coordinator_address=HOST:PORT too.")
  # Only used by the CPU backend (tests, laptops); harmless elsewhere.
  jax.config.update("jax_cpu_collectives_implementation",
                    args.cpu_collectives)
  if args.coordinator_address is not None:
    if args.process_id == 0:
      _check_coordinator_port(args.coordinator_address)
    jax.distributed.initialize(
        coordinator_address=args.coordinator_address,
        num_processes=args.num_processes, process_id=args.process_id)
    return
  options = {}
  gpus = [g for g in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]
  if "SLURM_STEP_NODELIST" in env and gpus:
    options["local_device_ids"] = list(range(len(gpus)))
  try:
    jax.distributed.initialize(**options)
    return
  except ValueError:  # JAX found no cluster to join.
    pass
  tpu_hosts = env.get("TPU_WORKER_HOSTNAMES", "").split(",")
  if len(tpu_hosts) > 1 and "TPU_WORKER_ID" in env:
    port = env.get("JAX_COORDINATOR_PORT", "8482")
    if int(env["TPU_WORKER_ID"]) == 0:
      _check_coordinator_port(f"{tpu_hosts[0]}:{port}")
    jax.distributed.initialize(
        coordinator_address=f"{tpu_hosts[0]}:{port}",
        num_processes=len(tpu_hosts), process_id=int(env["TPU_WORKER_ID"]))


def _check_coordinator_port(address: str) -> None:
  """Raises UserError where process 0 cannot serve JAX's coordinator at
  ``address``'s port (JAX binds it on every address of this host)."""
  port = int(address.rsplit(":", 1)[1])
  families = [(socket.AF_INET, "0.0.0.0")]
  if socket.has_ipv6:
    families.append((socket.AF_INET6, "::"))
  for family, host in families:
    with socket.socket(family) as probe:
      probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      try:
        probe.bind((host, port))
      except OSError as error:
        if error.errno == errno.EADDRINUSE:
          raise UserError(
              f"Port {port} of this host, where process 0 serves the "
              "coordinator of a multi-process run, is in use (by an earlier "
              "run still alive?); stop that process or choose another port "
              f"(coordinator address {address}).") from None
        # No IPv6 here, or an address JAX cannot bind either: JAX reports it.
