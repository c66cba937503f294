"""eqco_jax.program.run.train, in this process: a short run writes its
summary and run files, and the same call on the finished run does nothing
again (a run as a user starts it, killed and resumed: tests/scenarios/)."""

import json

from helpers import load_config
from eqco_jax.program.files.workdir import Workdir
from eqco_jax.program.run import train


def test_a_short_run_keeps_its_files_and_is_then_complete(tmp_path):
  config = load_config("quickstart.py", "tiny")
  config.update(dict(num_train_steps=2, log_every_steps=1, image_size=16,
                     batch_size=16, final_eval=False))
  summary = train.train_and_evaluate(config, Workdir(tmp_path))
  assert (summary["steps"], summary["num_devices"]) == (2, 8)
  assert summary["final_loss"] > 0 and summary["initial_grad_norm"] > 0
  assert json.loads((tmp_path / "summary.json").read_text()) == summary
  assert json.loads((tmp_path / "config.json").read_text())[
      "num_train_steps"] == 2
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
  progress = Workdir(tmp_path).read_progress()
  assert progress.step == 2 and progress.first_interval["loss"] > 0
  (tmp_path / "checkpoints" / "2" / "state").rename(tmp_path / "moved")
  # Complete: the summary is read back, nothing is restored or trained.
  assert train.train_and_evaluate(config, Workdir(tmp_path)) == summary
