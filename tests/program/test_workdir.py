"""eqco_jax.program.workdir: what a workdir holds, its records under today's
names, the skipped records kept across restarts, a workdir that cannot be
written."""

import json

import pytest

from helpers import load_config
from eqco_jax.core.errors import UserError
from eqco_jax.program import workdir as workdir_lib


def test_a_run_config_reads_back_under_todays_names(tmp_path):
  config = load_config("quickstart.py", "tiny")
  directory = workdir_lib.Workdir(str(tmp_path))
  directory.write_run_config(config)
  as_json = lambda c: json.loads(c.to_json_best_effort())
  assert as_json(workdir_lib.read_run_config(str(tmp_path))) == as_json(
      config)
  # A config.json of an older version: renamed fields and head values.
  old = json.loads(config.to_json_best_effort())
  old["momentum"] = old.pop("ema_momentum")
  old["linear_probe"] = old.pop("linear_eval")
  old["head"] = "simo"
  (tmp_path / workdir_lib.CONFIG).write_text(json.dumps(old))
  assert as_json(workdir_lib.read_run_config(str(tmp_path))) == as_json(
      config)


def test_a_missing_run_says_what_to_point_at(tmp_path):
  with pytest.raises(UserError) as error:
    workdir_lib.read_run_config(str(tmp_path), flag="--workdir")
  assert str(error.value) == (
      f"{tmp_path}/config.json does not exist; point --workdir at the "
      "--workdir of a pretraining run.")
  with pytest.raises(UserError, match=r"^config.pretrain_workdir is not set; "
                     r"pass --config.pretrain_workdir=DIR of a pretraining "
                     r"run\.$"):
    workdir_lib.read_run_config(None)


def test_skipped_records_are_kept_per_process_and_counted_once(tmp_path):
  directory = workdir_lib.Workdir(str(tmp_path))
  skipped = directory.skipped_records(process_index=1)
  assert skipped.count(100) == 0
  directory.save_skipped_records(skipped, process_index=1)
  assert not list(tmp_path.iterdir())  # Nothing skipped, nothing written.
  skipped.add(3, ["shard-0__7"])
  skipped.add(9, ["shard-1__2", "shard-1__5"])
  directory.save_skipped_records(skipped, process_index=1)
  assert (tmp_path / "skipped_records.process_1.json").exists()
  again = directory.skipped_records(process_index=1)
  again.add(3, ["shard-0__7"])  # A resumed run reads step 3 again.
  assert again.by_step == {3: ["shard-0__7"], 9: ["shard-1__2", "shard-1__5"]}
  assert (again.count(8), again.count(9)) == (1, 3)
  assert directory.skipped_records(process_index=0).count(9) == 0


def test_a_workdir_that_cannot_be_written_is_one_sentence(tmp_path):
  (tmp_path / "file").write_text("not a folder")
  location = str(tmp_path / "file" / "run")
  with pytest.raises(UserError) as error:
    workdir_lib.prepare(location)
  message = str(error.value)
  assert message.startswith(f"cannot write to the workdir {location} (")
  assert message.endswith("or choose another --workdir.")
  assert "\n" not in message
  prepared = workdir_lib.prepare(str(tmp_path / "new" / "run"))
  assert prepared.checkpoints == tmp_path / "new" / "run" / "checkpoints"
  assert list((tmp_path / "new" / "run").iterdir()) == []
