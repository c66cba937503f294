"""python -m eqco_jax.main --config=FILE.py[:VARIANT] --workdir=DIR
    [--config.FIELD=VALUE ...]

Pretrains a contrastive model (SiMo or MoCo v2, with or without EqCo) and
evaluates its backbone, or runs the linear evaluation of a pretraining run
(--config=configs/linear_eval.py:imagenet
--config.pretrain_workdir=RUN). The same command again resumes a run from
its newest checkpoint. The result goes to standard output, the log to
standard error; checkpoints, summary.json and TensorBoard events go to
--workdir.

Configs: configs/ holds the recipes (quickstart.py, simo.py, mocov2.py,
cifar10.py, linear_eval.py; each file names its variants). Set any field
with --config.FIELD=VALUE, e.g. --config.batch_size=256 or
--config.augment.blur_prob=0.5; --print_config prints the whole config
after the overrides (as JSON) and exits.

Multi-process runs: the same command on every process, with
--coordinator_address, --num_processes and --process_id (none of them
where JAX detects the cluster: Cloud TPU, SLURM, Open MPI, Kubernetes).
--verbosity=1 adds the libraries' INFO lines to the log.
"""

from eqco_jax.program.commands import cli
from eqco_jax.program.commands.main import define_flags, main

if __name__ == "__main__":
  cli.run(main, define_flags)
