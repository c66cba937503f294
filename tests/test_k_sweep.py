"""The K sweep driver: one row per run, resumable, plots written."""

import json

from experiments import k_sweep


def test_sweep_writes_rows_skips_finished_runs_and_plots(tmp_path, capsys):
  common = ["--workdir", str(tmp_path / "runs"),
            "--results", str(tmp_path / "k_sweep.json"),
            "--plots", str(tmp_path), "--methods", "simo", "--seeds", "0",
            "--width", "4", "--image_size", "16", "--steps", "4",
            "--batch_size", "16"]
  k_sweep.main(common + ["--ks", "2"])
  rows = json.loads((tmp_path / "k_sweep.json").read_text())
  assert [(r["eqco"], r["num_negatives"]) for r in rows] == [(True, 2),
                                                             (False, 2)]
  eqco, infonce = rows
  assert eqco["alpha"] == 65536.0 and infonce["alpha"] == 2.0
  for row in rows:
    assert set(row) >= {"method", "eqco", "alpha", "num_negatives", "seed",
                        "top1", "steps", "final_loss", "initial_grad_norm"}
    assert row["steps"] == 4 and 0.0 <= row["top1"] <= 1.0
  # EqCo's shift log(alpha / K) makes its loss far larger at K = 2.
  assert eqco["final_loss"] > infonce["final_loss"] + 5

  capsys.readouterr()
  k_sweep.main(common + ["--ks", "2"])  # started again: nothing left to run
  out = capsys.readouterr().out
  assert out.count("done before, skipped") == 2
  assert "| simo | 2 | " in out  # the summary table
  assert len(json.loads((tmp_path / "k_sweep.json").read_text())) == 2
  assert (tmp_path / "k_sweep_top1.png").stat().st_size > 1000
  assert (tmp_path / "k_sweep_grad_norm.png").stat().st_size > 1000


def test_moco_runs_use_moco_v2s_own_recipe():
  args = k_sweep.parse_args([])
  simo = k_sweep.run_config(args, "simo", True, 16, 0)
  moco = k_sweep.run_config(args, "mocov2", False, 16, 0)
  assert (simo.num_train_steps, simo.batch_size, simo.num_negatives) == (
      300, 264, 16)
  assert (moco.num_train_steps, moco.base_learning_rate,
          moco.zero_init_residual, moco.ema_momentum, moco.head, moco.eqco,
          moco.batch_size, moco.queue_size, moco.num_negatives) == (
              600, 0.03, False, 0.99, "mocov2", False, 128, 128, 16)
  whole_queue = k_sweep.run_config(args, "mocov2", True, 256, 0)
  assert (whole_queue.queue_size, whole_queue.num_negatives) == (256, None)
