"""Joining a multi-process run: ``jax.distributed.initialize`` from the
flags, or from the cluster JAX detects (Cloud TPU, SLURM, Open MPI,
Kubernetes), and the check that process 0 can serve the coordinator."""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import re
import socket
import warnings
from typing import Iterator

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
                       "Processes in a multi-process run (1: this process "
                       "alone, whatever cluster it runs in).", **define)
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

  * Kubernetes: JAX joins the pods of an Indexed Job (or a JobSet's), which
    have ``JOB_COMPLETION_INDEX``, through the Kubernetes API (the
    ``kubernetes`` package: the ``k8s`` extra). Where it cannot (no package,
    no permission to read the Job, no headless service), a UserError says
    why instead of N runs of one process; any other pod is one process, and
    JAX does not ask the API about it (:func:`_kubernetes_detection`).

  ``--num_processes=1`` alone is one process without any detection.
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
  if args.num_processes == 1:
    return
  options = {}
  gpus = [g for g in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]
  if "SLURM_STEP_NODELIST" in env and gpus:
    options["local_device_ids"] = list(range(len(gpus)))
  pod = env.get("JOB_COMPLETION_INDEX") if _IN_KUBERNETES in env else None
  try:
    with _kubernetes_detection(pod):
      jax.distributed.initialize(**options)
    return
  except ValueError as error:  # JAX found no cluster to join (or refused it)
    refused = error
  except Exception as error:  # pylint: disable=broad-except
    if pod is None or "TPU_WORKER_HOSTNAMES" in env:  # (GKE's TPU pods)
      raise
    raise UserError(_unjoined_pod(pod, error)) from None
  tpu_hosts = env.get("TPU_WORKER_HOSTNAMES", "").split(",")
  if len(tpu_hosts) > 1 and "TPU_WORKER_ID" in env:
    port = env.get("JAX_COORDINATOR_PORT", "8482")
    if int(env["TPU_WORKER_ID"]) == 0:
      _check_coordinator_port(f"{tpu_hosts[0]}:{port}")
    jax.distributed.initialize(
        coordinator_address=f"{tpu_hosts[0]}:{port}",
        num_processes=len(tpu_hosts), process_id=int(env["TPU_WORKER_ID"]))
  elif pod is not None:
    raise UserError(_unjoined_pod(pod, refused))


# Set in every pod of a Kubernetes cluster; JAX's detection keys on it.
_IN_KUBERNETES = "KUBERNETES_SERVICE_HOST"
_ONE_RUN_A_POD = ("or pass --coordinator_address, --num_processes and "
                  "--process_id (--num_processes=1 where each pod is a run of "
                  "its own).")


@contextlib.contextmanager
def _kubernetes_detection(pod: str | None) -> Iterator[None]:
  """Around ``jax.distributed.initialize()``: JAX's Kubernetes detection
  only in a pod of an Indexed Job (``pod``, its index), the only kind it can
  join; in any other pod JAX would ask the API server and fail (a
  Deployment's pod, or one whose service account may not read pods), where
  that pod is a run of its own. JAX's warning that the ``kubernetes``
  package is missing is left out: :func:`_unjoined_pod` says it."""
  hidden = {}
  if pod is None and _IN_KUBERNETES in os.environ:
    hidden[_IN_KUBERNETES] = os.environ.pop(_IN_KUBERNETES)
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", "Kubernetes environment detected")
      yield
  finally:
    os.environ.update(hidden)


def _unjoined_pod(pod: str, error: Exception) -> str:
  """The sentence for pod ``pod`` of an Indexed Job that JAX did not join
  to the others, failing with ``error``."""
  if importlib.util.find_spec("kubernetes") is None:
    return (f"this is pod {pod} of an indexed Kubernetes Job, whose other "
            "pods JAX finds through the Kubernetes API with the kubernetes "
            "package, which is not installed; install it with the program "
            "(pip install -c constraints.txt -e '.[train,k8s]'), "
            + _ONE_RUN_A_POD)
  # JAX's messages: a paragraph (its lines filled), then perhaps YAML.
  text = " ".join(str(error).split("```")[0].split())
  reason = re.split(r"(?<=\.) ", text, maxsplit=1)[0]
  return (f"JAX could not join pod {pod} of this indexed Kubernetes Job to "
          f"the others ({type(error).__name__}: {reason}); the Job needs "
          "completionMode: Indexed, a headless service as its pods' "
          "subdomain and a service account that may read its pods and jobs "
          "(https://docs.jax.dev/en/latest/multi_process.html#kubernetes-"
          "example), " + _ONE_RUN_A_POD)


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
