"""The program: ``python -m eqco_jax.main --config=configs/simo.py:VARIANT
--workdir=DIR`` (``eqco_jax/main.py`` is its public path).

Every process of a multi-host run starts this same command. Distributed
initialisation: explicit ``--coordinator_address/--num_processes/--process_id``,
or automatic detection on Cloud TPU and SLURM, or a single process.
"""

from __future__ import annotations

import contextlib
import errno
import logging as std_logging
import os
import socket
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import ml_collections  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from eqco_jax.core import config as config_lib  # noqa: E402
from eqco_jax.core.errors import UserError  # noqa: E402
from eqco_jax.program import cli  # noqa: E402

FLAGS = flags.FLAGS
cli.check_flagfiles(sys.argv)  # (read while --config is defined)
config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a variant: FILE.py:VARIANT.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and summary go.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")
flags.DEFINE_string("cpu_collectives", "gloo",
                    "CPU collectives for multi-process CPU runs (gloo|mpi).")
flags.DEFINE_bool("print_config", False,
                  "Check the config after overrides, print it as JSON and "
                  "exit without touching data, devices or the workdir.")
flags.mark_flags_as_required(["config"])


def _initialize_distributed(args: flags.FlagValues = FLAGS) -> None:
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
  one workdir together; its lease (``lease.py``) refuses all but the first.
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


class _ProcessTag(std_logging.Filter):
  """Prefixes every log line with the process that wrote it."""

  def __init__(self, index: int, count: int):
    super().__init__()
    self.prefix = f"[process {index}/{count}] "

  def filter(self, record: std_logging.LogRecord) -> bool:
    record.msg = self.prefix + str(record.msg)
    return True


class _QuietLibraries(std_logging.Filter):
  """Drops the per-save INFO chatter of orbax and its storage layers."""

  NOISY = ("/orbax/", "/tensorstore/", "/etils/")

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno > std_logging.INFO or not any(
        part in record.pathname for part in self.NOISY)


def check(config: ml_collections.ConfigDict) -> None:
  """Raises UserError for a bad value in ``config``, before data, devices,
  the workdir and TensorFlow (within a second): every field of a pretraining
  config, the protocol of a linear evaluation (the rest is the pretraining
  run's). The batch sizes' divisibility by the devices is checked later."""
  if config.get("mode") == "linear_eval":
    config_lib.validate_linear_eval(config, "")
  else:
    config_lib.validate(config)


def main(args: flags.FlagValues) -> None:
  """Pretraining or linear evaluation, as ``--config`` says."""
  config = args.config
  if not args.workdir and not args.print_config:
    sys.exit("error: --workdir is missing; pass --workdir=DIR, the directory "
             "the run writes to (only --print_config needs none).")
  try:
    check(config)
  except UserError as error:
    sys.exit(f"error: {error}")
  if args.print_config:
    print(config.to_json_best_effort(indent=2, sort_keys=True))
    return
  from eqco_jax.data import catalog
  from eqco_jax.program import workdir
  # gcsfs logs a traceback for every request it gives up on, and warns on
  # every bucket it cannot classify without credentials; its failures reach
  # the user as our own one-sentence errors.
  std_logging.getLogger("gcsfs").setLevel(std_logging.CRITICAL)
  try:  # Before the heavy imports: a missing dataset or an unreachable
    # workdir stops in a second or two.
    if config.get("mode") == "linear_eval" and not config.get("init_from"):
      workdir.read_run_config(config.pretrain_workdir)
    if config.get("dataset"):  # linear eval may take it from the run
      catalog.check_present(config)
    workdir.prepare(args.workdir)
    _initialize_distributed(args)
  except UserError as error:
    sys.exit(f"error: {error}")
  import jax

  # TensorFlow is only the input pipeline: keep it off the accelerators.
  cli.import_tensorflow().config.set_visible_devices([], "GPU")
  from eqco_jax.program import compilation
  from eqco_jax.program import lease

  logging.get_absl_handler().addFilter(_QuietLibraries())
  logging.get_absl_handler().addFilter(
      _ProcessTag(jax.process_index(), jax.process_count()))
  logging.info("Process %d/%d, %d local / %d global devices (%s).",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  cache = compilation.use_cache(config.get("compilation_cache_dir"))
  logging.info("Persistent compilation cache: %s.", cache or "off")
  try:  # The result on stdout (process 0); everything else is logged.
    with (lease.Lease(args.workdir) if jax.process_index() == 0
          else contextlib.nullcontext()):
      _run(config, args.workdir)
  except UserError as error:
    logging.error("%s", error)
    sys.exit(f"error: {error}")


def _run(config, workdir: str) -> None:
  """Pretraining or linear evaluation in ``workdir``, whose lease is held;
  the result goes to standard output (process 0)."""
  import jax  # pylint: disable=g-import-not-at-top

  from eqco_jax.program import linear_eval  # pylint: disable=g-import-not-at-top
  from eqco_jax.program import train  # pylint: disable=g-import-not-at-top

  if config.get("mode", "pretrain") == "linear_eval":
    results = linear_eval.run(config, workdir)
    if jax.process_index() == 0:
      print(linear_eval.results_line(results))
  else:
    summary = train.train_and_evaluate(config, workdir)
    if summary and jax.process_index() == 0:
      print(train.summary_table(summary))
