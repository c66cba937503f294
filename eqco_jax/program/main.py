"""The program: ``python -m eqco_jax.main --config=configs/simo.py:VARIANT
--workdir=DIR`` (``eqco_jax/main.py`` is its public path).

Every process of a multi-host run starts this same command. Distributed
initialisation: explicit ``--coordinator_address/--num_processes/--process_id``,
or automatic detection on Cloud TPU and SLURM, or a single process.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
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
                  "Print the config after overrides as JSON and exit without "
                  "touching data, devices or the workdir.")
flags.mark_flags_as_required(["config"])


def _on_tpu_vm() -> bool:
  """Whether this machine has TPU chips (a Cloud TPU VM), before JAX starts."""
  try:  # JAX's own probe of the PCI bus; private, hence the guard.
    from jax._src import hardware_utils
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except Exception:  # pylint: disable=broad-except
    return False


def _initialize_distributed() -> None:
  """``jax.distributed.initialize`` when this run spans several processes.

  Explicit flags win. Otherwise JAX detects the cluster: a Cloud TPU VM (its
  metadata server), SLURM (``SLURM_*`` of an ``srun`` task), Open MPI. Two
  additions:

  * SLURM with one task per node driving several GPUs: JAX would make only
    GPU number ``SLURM_LOCALID`` visible; every GPU SLURM gave the task stays.
  * ``TPU_WORKER_HOSTNAMES`` and ``TPU_WORKER_ID`` without TPU chips (JAX reads
    them itself only on TPU hardware): the coordinator is the first host at
    ``JAX_COORDINATOR_PORT`` (8482, JAX's TPU default), one process per host.
    This is how ``tests/fakes/bin/gcloud`` runs a pod slice's workers on CPU.
  """
  import jax  # After absl parsed flags: nothing touches devices before.

  explicit = FLAGS.coordinator_address is not None
  env = os.environ
  slurm = "SLURM_STEP_NODELIST" in env and env.get("SLURM_NTASKS", "1") != "1"
  tpu_hosts = env.get("TPU_WORKER_HOSTNAMES", "").split(",")
  emulated_pod = (len(tpu_hosts) > 1 and "TPU_WORKER_ID" in env
                  and not _on_tpu_vm())
  if FLAGS.num_processes and FLAGS.num_processes > 1 and not explicit:
    raise app.UsageError(
        "--num_processes > 1 needs --coordinator_address=HOST:PORT too.")
  if explicit or emulated_pod:
    # Only used by the CPU backend (tests, laptops); harmless elsewhere.
    jax.config.update("jax_cpu_collectives_implementation",
                      FLAGS.cpu_collectives)
  if explicit:
    jax.distributed.initialize(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  elif emulated_pod:
    port = env.get("JAX_COORDINATOR_PORT", "8482")
    jax.distributed.initialize(
        coordinator_address=f"{tpu_hosts[0]}:{port}",
        num_processes=len(tpu_hosts), process_id=int(env["TPU_WORKER_ID"]))
  elif slurm:
    gpus = [g for g in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]
    jax.distributed.initialize(
        local_device_ids=list(range(len(gpus))) if gpus else None)
  elif "OMPI_COMM_WORLD_SIZE" in env or _on_tpu_vm():
    jax.distributed.initialize()


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


def main(args: flags.FlagValues) -> None:
  """Pretraining or linear evaluation, as ``--config`` says."""
  config = args.config
  if args.print_config:
    print(config.to_json_best_effort(indent=2, sort_keys=True))
    return
  if not args.workdir:
    raise app.UsageError("--workdir is required (unless --print_config).")
  from eqco_jax.core.errors import UserError
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
  except UserError as error:
    sys.exit(f"error: {error}")
  _initialize_distributed()
  import jax
  import tensorflow as tf

  # TensorFlow is only the input pipeline: keep it off the accelerators.
  tf.config.set_visible_devices([], "GPU")
  from eqco_jax.program import compilation
  from eqco_jax.program import linear_eval
  from eqco_jax.program import train

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
    if config.get("mode", "pretrain") == "linear_eval":
      results = linear_eval.run(config, args.workdir)
      if jax.process_index() == 0:
        print(linear_eval.results_line(results))
    else:
      summary = train.train_and_evaluate(config, args.workdir)
      if summary and jax.process_index() == 0:
        print(train.summary_table(summary))
  except UserError as error:
    logging.error("%s", error)
    sys.exit(f"error: {error}")
