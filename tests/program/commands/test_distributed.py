"""eqco_jax.program.commands.distributed: what a process asks of
``jax.distributed.initialize`` in each environment, a taken coordinator
port said in one sentence before JAX sees it, and the pods of a Kubernetes
Job joined by JAX's own detection (against a fake API server) or refused in
one sentence."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import types
import warnings

import jax
import pytest
from jax._src import clusters

import fakes
from fakes import kubernetes_api
from eqco_jax.core.errors import UserError
from eqco_jax.program.commands import distributed


def _environment(monkeypatch, environ: dict[str, str]) -> None:
  """This process's environment without any cluster's variables, and with
  ``environ``."""
  for name in list(os.environ):
    if name.startswith(("SLURM_", "TPU_", "OMPI_", "JAX_COORDINATOR",
                        "CUDA_VISIBLE", "KUBERNETES", "JOB_COMPLETION")):
      monkeypatch.delenv(name)
  for name, value in environ.items():
    monkeypatch.setenv(name, value)


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
  _environment(monkeypatch, environ)
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
  _environment(monkeypatch, {})
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


# ------------------------------------------------------------- Kubernetes.
POD_1 = {"HOSTNAME": "train-1-x7k2p", "JOB_COMPLETION_INDEX": "1"}
_ADDRESSES = {"train-1-x7k2p": "10.8.0.2", "train-0.jaxpods": "10.8.0.1"}


@pytest.fixture
def kubernetes(monkeypatch, tmp_path):
  """A fake Kubernetes API server and what a pod sees of it; JAX's
  Kubernetes detection reads it (its answers cached per test only), and
  host names resolve from ``_ADDRESSES`` alone. Yields ``serve(answers)``,
  a context manager that serves ``answers`` and sets the pod's
  environment."""
  import kubernetes as k8s  # pylint: disable=g-import-not-at-top
  k8s_cluster = clusters.K8sCluster
  monkeypatch.setattr(k8s_cluster, "_namespace",
                      classmethod(lambda cls: kubernetes_api.NAMESPACE))

  def resolve(name):
    if name not in _ADDRESSES:
      raise socket.gaierror(f"no address for {name} in this test")
    return _ADDRESSES[name]

  monkeypatch.setattr(socket, "gethostbyname", resolve)

  @contextlib.contextmanager
  def serve(answers, environ=POD_1):
    with kubernetes_api.serving(tmp_path, answers) as pod:
      monkeypatch.setattr(k8s.config.incluster_config,
                          "SERVICE_TOKEN_FILENAME", str(pod["token"]))
      monkeypatch.setattr(k8s.config.incluster_config,
                          "SERVICE_CERT_FILENAME", str(pod["ca"]))
      _environment(monkeypatch, {**pod["environ"], **environ})
      yield pod

  yield serve
  for name in ("_pod", "_job", "_headless_svc", "_controller"):
    getattr(k8s_cluster, name).__func__.cache_clear()


def _jax_detection(monkeypatch) -> list[tuple]:
  """Makes ``jax.distributed.initialize()`` run JAX's own cluster
  detection only (joining nothing); returns the list of what it found."""
  found = []

  def initialize(**kwargs):
    detected = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, kwargs.get("local_device_ids"), None, 300)
    found.append(detected)
    if detected[0] is None:
      raise ValueError("coordinator_address should be defined.")

  monkeypatch.setattr(jax.distributed, "initialize", initialize)
  monkeypatch.setattr(jax.config, "update", lambda *args: None)
  return found


def test_the_pods_of_an_indexed_job_join_through_jaxs_detection(
    monkeypatch, kubernetes):
  """With the k8s extra's client, JAX finds the coordinator (pod 0, by the
  Job's headless service), the Job's parallelism and this pod's index."""
  found = _jax_detection(monkeypatch)
  with kubernetes(kubernetes_api.routes(1, parallelism=2)) as pod:
    distributed.initialize(_flags())
  assert found == [("train-0.jaxpods:55527", 2, 1, None)]
  assert pod["requests"] == [
      "/api/v1/namespaces/team/pods?fieldSelector=status.podIP%3D10.8.0.2",
      "/apis/batch/v1/namespaces/team/jobs/train"]


@pytest.mark.parametrize("failure", ["forbidden", "no headless service"])
def test_a_job_jax_cannot_join_is_one_sentence(monkeypatch, kubernetes,
                                               failure):
  _jax_detection(monkeypatch)
  answers = kubernetes_api.routes(1, parallelism=2, subdomain=None)
  if failure == "forbidden":
    answers = dict.fromkeys(answers, kubernetes_api.FORBIDDEN)
  with kubernetes(answers), pytest.raises(UserError) as error:
    distributed.initialize(_flags())
  reason = {
      "forbidden": "Kubernetes API Error: 403 - Forbidden It appears that "
                   "the Kubernetes service account (SA) associated with "
                   "this job does not have the permission for pod "
                   "introspection.",
      "no headless service": "Pods within a job need a headless service in "
                             "order to communicate with each other."}[failure]
  assert str(error.value) == (
      f"JAX could not join pod 1 of this indexed Kubernetes Job to the "
      f"others (RuntimeError: {reason}); the Job needs completionMode: "
      "Indexed, a headless service as its pods' subdomain and a service "
      "account that may read its pods and jobs "
      "(https://docs.jax.dev/en/latest/multi_process.html#kubernetes-"
      "example), or pass --coordinator_address, --num_processes and "
      "--process_id (--num_processes=1 where each pod is a run of its own).")


def test_any_other_pod_is_one_process_and_the_api_is_not_asked(
    monkeypatch, kubernetes):
  """A pod of no Indexed Job (a Deployment's, a plain pod) is a run of its
  own: JAX's detection would ask the API server, and fail."""
  found = _jax_detection(monkeypatch)
  answers = dict.fromkeys(kubernetes_api.routes(0, parallelism=1),
                          kubernetes_api.FORBIDDEN)
  with kubernetes(answers, environ={"HOSTNAME": "web-5d9c-x7k2p"}) as pod:
    distributed.initialize(_flags())
    assert "KUBERNETES_SERVICE_HOST" in os.environ  # given back
  assert pod["requests"] == [] and found == [(None, None, None, None)]


def test_an_indexed_job_without_the_kubernetes_package_is_one_sentence(
    monkeypatch):
  """Where the kubernetes package is missing, JAX warns and finds no
  cluster: each pod would train alone, as process 0 of 1."""
  monkeypatch.setitem(sys.modules, "kubernetes", None)  # not importable
  _jax_detection(monkeypatch)
  _environment(monkeypatch, {"KUBERNETES_SERVICE_HOST": "10.0.0.1",
                             "KUBERNETES_SERVICE_PORT": "443", **POD_1})
  with warnings.catch_warnings(record=True) as warned:
    warnings.simplefilter("always")
    with pytest.raises(UserError) as error:
      distributed.initialize(_flags())
  assert str(error.value) == (
      "this is pod 1 of an indexed Kubernetes Job, whose other pods JAX "
      "finds through the Kubernetes API with the kubernetes package, which "
      "is not installed; install it with the program (pip install -c "
      "constraints.txt -e '.[train,k8s]'), or pass --coordinator_address, "
      "--num_processes and --process_id (--num_processes=1 where each pod is "
      "a run of its own).")
  assert not [w for w in warned if "Kubernetes" in str(w.message)]
  # --num_processes=1: this pod is a run of its own, nothing is detected.
  monkeypatch.setattr(jax.distributed, "initialize", pytest.fail)
  distributed.initialize(types.SimpleNamespace(**{
      **vars(_flags()), "num_processes": 1}))
