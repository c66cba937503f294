"""eqco_jax.program.workdir: what a workdir holds, its records under today's
names, the skipped records kept across restarts, the run's progress, damaged
records, a workdir that cannot be written."""

import json

import pytest

from helpers import LoggedWarnings, load_config
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


def test_progress_reads_back_and_a_run_before_it_gives_its_first_interval(
    tmp_path):
  directory = workdir_lib.Workdir(str(tmp_path))
  assert directory.read_progress() == workdir_lib.Progress()
  # A workdir of a run made before progress.json.
  (tmp_path / workdir_lib.FIRST_INTERVAL_METRICS).write_text(
      '{"grad_norm": 2.5}')
  assert directory.read_progress().first_interval == {"grad_norm": 2.5}
  progress = workdir_lib.Progress(
      step=8, first_interval={"grad_norm": 2.5}, last_interval={"loss": 7.0},
      timed_steps=4, timed_seconds=1.5,
      final_evaluation={"pretrained": {"knn_top1": 0.5}})
  directory.write_progress(progress)
  assert directory.read_progress() == progress
  with pytest.raises(ValueError):  # records are strict JSON: no NaN
    directory.write_progress(workdir_lib.Progress(
        last_interval={"loss": float("nan")}))
  assert directory.read_progress() == progress


LOST_PROGRESS = ("the summary's initial_grad_norm, and its final_loss and "
                 "images_per_sec if training had finished")


@pytest.mark.parametrize("name, content, read, expected", [
    ("summary.json", '{"method": "si', "summary", None),
    ("progress.json", '{"step": 8, "first_inte', "progress",
     f"not valid JSON: Unterminated string starting at: line 1 column 13 "
     f"(char 12)), and the rest of the workdir cannot rebuild it: restore it "
     f"from a copy, or move it aside and run the same command again (losing "
     f"{LOST_PROGRESS})."),
    ("progress.json", '{"steps": 8}', "progress",
     "Progress.__init__() got an unexpected keyword argument 'steps'), and "),
    ("progress.json", '{"step": \xff}', "progress",
     "not valid JSON: 'utf-8' codec can't decode byte 0xff"),
    ("skipped_records.process_1.json", '{"3": ["shard-0__7"', "skipped",
     "and the rest of the workdir cannot rebuild it: restore it from a copy, "
     "or move it aside and run the same command again (losing the count of "
     "the unreadable records it listed)."),
    ("skipped_records.process_1.json", '["shard-0__7"]', "skipped",
     "is damaged ('list' object has no attribute 'items'), and the rest"),
    ("config.json", '{"method": "si', "config",
     "; run that workdir's pretraining command again (it writes config.json "
     "at every start, and a finished run only rewrites what is missing), "
     "then this one."),
])
def test_a_damaged_record_is_rebuilt_or_refused_in_one_sentence(
    tmp_path, name, content, read, expected):
  """Truncated, not UTF-8, or of the wrong shape: the summary is made again
  (a warning); any other record stops the run in one sentence naming it."""
  (tmp_path / name).write_bytes(content.encode("latin-1"))
  directory = workdir_lib.Workdir(str(tmp_path))
  readers = {
      "summary": lambda: directory.read_json(workdir_lib.SUMMARY),
      "progress": directory.read_progress,
      "skipped": lambda: directory.skipped_records(process_index=1),
      "config": lambda: workdir_lib.read_run_config(str(tmp_path)),
  }
  with LoggedWarnings() as warnings:
    if expected is None:
      assert readers[read]() is None
    else:
      with pytest.raises(UserError) as error:
        readers[read]()
      message = str(error.value)
      assert message.startswith(f"{tmp_path / name} is damaged (")
      assert expected in message and "\n" not in message
  if expected is None:
    assert warnings.messages == [
        f"{tmp_path / name} is damaged (not valid JSON: Unterminated string "
        "starting at: line 1 column 12 (char 11)); it will be written again "
        "when the run ends (the final evaluation's finished parts are kept "
        "in progress.json)."]
  else:
    assert not warnings.messages
  assert (tmp_path / name).read_bytes() == content.encode("latin-1")
