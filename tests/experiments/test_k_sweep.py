"""The K sweep's recipes (its command runs in test_documented_commands.py)."""

from experiments import k_sweep


def test_moco_runs_use_moco_v2s_own_recipe():
  args = k_sweep.parse_args([])
  simo = k_sweep.run_config(args, "simo", True, 16, 0)
  moco = k_sweep.run_config(args, "mocov2", False, 16, 0)
  assert (simo.num_train_steps, simo.batch_size, simo.num_negatives) == (
      300, 264, 16)
  assert (moco.num_train_steps, moco.base_learning_rate,
          moco.zero_init_residual, moco.ema_momentum, moco.head, moco.eqco,
          moco.batch_size, moco.queue_size, moco.num_negatives) == (
              600, 0.03, False, 0.99, "mlp", False, 128, 128, 16)
  whole_queue = k_sweep.run_config(args, "mocov2", True, 256, 0)
  assert (whole_queue.queue_size, whole_queue.num_negatives) == (256, None)
