"""The K sweep's recipes (its command runs in test_documented_commands.py)."""

import pytest

from eqco_jax.core.errors import UserError
from experiments import k_sweep


def test_moco_runs_use_moco_v2s_own_recipe():
  args = k_sweep.parse_args([])
  simo = k_sweep.run_config(args, "simo", True, 16, 0)
  moco = k_sweep.run_config(args, "mocov2", False, 16, 0)
  # SiMo's batch holds the largest K's negatives (256 + 1, rounded up to 8).
  assert (simo.num_train_steps, simo.batch_size, simo.num_negatives,
          simo.alpha, simo.width) == (300, 264, 16, 65536.0, 8)
  assert (moco.num_train_steps, moco.base_learning_rate,
          moco.zero_init_residual, moco.ema_momentum, moco.head, moco.eqco,
          moco.batch_size, moco.queue_size, moco.num_negatives) == (
              600, 0.03, False, 0.99, "mlp", False, 128, 128, 16)
  assert moco.width == 8
  whole_queue = k_sweep.run_config(args, "mocov2", True, 256, 0)
  assert (whole_queue.queue_size, whole_queue.num_negatives) == (256, None)


def test_a_config_of_the_other_method_is_refused_in_one_sentence():
  args = k_sweep.parse_args(["--mocov2_config.method=simo"])
  with pytest.raises(UserError, match=r"^the mocov2 runs' config is a simo "
                     r"recipe; give --mocov2_config a mocov2 one\.$"):
    k_sweep.run_config(args, "mocov2", True, 16, 0)
