"""The program: ``python -m eqco_jax.main --config=configs/simo.py:VARIANT
--workdir=DIR`` (``eqco_jax/main.py`` is its public path): pretraining, or
the linear evaluation of a pretraining run when the config says so.

Every process of a multi-host run starts this same command (joining the
run: ``distributed``).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import ml_collections  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from eqco_jax.core import config as config_lib  # noqa: E402
from eqco_jax.core.errors import UserError  # noqa: E402
from eqco_jax.program import logs  # noqa: E402
from eqco_jax.program.commands import cli  # noqa: E402
from eqco_jax.program.commands import distributed  # noqa: E402


def define_flags(flag_values: flags.FlagValues) -> None:
  """The program's flags, on ``flag_values``."""
  define = dict(flag_values=flag_values)
  config_flags.DEFINE_config_file(
      "config", None,
      "Config file, optionally with a variant: FILE.py:VARIANT.",
      lock_config=True, **define)
  flags.DEFINE_string("workdir", None,
                      "Where checkpoints, logs and summary go.", **define)
  flags.DEFINE_bool("print_config", False,
                    "Check the config after overrides, print it as JSON and "
                    "exit without touching data, devices or the workdir.",
                    **define)
  distributed.define_flags(flag_values)
  flags.mark_flags_as_required(["config"], flag_values=flag_values)


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
    raise UserError("--workdir is missing; pass --workdir=DIR, the directory "
                    "the run writes to (only --print_config needs none).")
  check(config)
  if args.print_config:
    print(config.to_json_best_effort(indent=2, sort_keys=True))
    return
  from eqco_jax.data import catalog
  from eqco_jax.program.files import workdir as workdir_lib
  logs.quiet_libraries()
  # Before the heavy imports: a missing dataset or an unreachable workdir
  # stops in a second or two.
  if config.get("mode") == "linear_eval" and not config.get("init_from"):
    workdir_lib.of_run(config.pretrain_workdir).read_run_config()
  if config.get("dataset"):  # linear eval may take it from the run
    catalog.check_present(config)
  workdir = workdir_lib.prepare(args.workdir)
  distributed.initialize(args)
  import jax  # pylint: disable=g-import-not-at-top

  from eqco_jax.program.run import compilation
  # Before TensorFlow's import: a cache folder that does not answer is said
  # within 20 s of the launch.
  cache = compilation.use_cache(config.get("compilation_cache_dir"),
                                str(workdir),
                                multi_process=jax.process_count() > 1)
  # TensorFlow is only the input pipeline: keep it off the accelerators.
  cli.import_tensorflow().config.set_visible_devices([], "GPU")
  from eqco_jax.program.files import lease

  logs.tag_processes(jax.process_index(), jax.process_count())
  logging.info("Process %d/%d, %d local / %d global devices (%s).",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  logging.info("Persistent compilation cache: %s.", cache or "off")
  from eqco_jax.program.run import stopping
  stopping.forget_parked()
  try:  # The result on stdout (process 0); everything else is logged.
    with lease.Holding(workdir):
      _run(config, workdir)
  except UserError as error:
    logging.error("%s", error)  # in every process's log too
    raise
  stopping.exit_if_stopped()  # a preemption notice leaves seconds


def _run(config: ml_collections.ConfigDict, workdir) -> None:
  """Pretraining or linear evaluation in ``workdir``, whose lease is held;
  the result goes to standard output (process 0)."""
  import jax  # pylint: disable=g-import-not-at-top

  from eqco_jax.program.commands import linear_eval  # pylint: disable=g-import-not-at-top
  from eqco_jax.program.run import bookkeeping  # pylint: disable=g-import-not-at-top
  from eqco_jax.program.run import train  # pylint: disable=g-import-not-at-top

  if config.get("mode", "pretrain") == "linear_eval":
    results = linear_eval.run(config, workdir)
    if results and jax.process_index() == 0:  # (empty: stopped, saved)
      print(linear_eval.results_line(results))
  else:
    summary = train.train_and_evaluate(config, workdir)
    if summary and jax.process_index() == 0:
      print(bookkeeping.summary_table(summary))
