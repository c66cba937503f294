"""eqco_jax.program.files.workdir: the paths a workdir owns, the run's config
read back, the run files kept across restarts, damaged run files, a workdir
that cannot be written."""

import json

import pytest

from helpers import LoggedWarnings, load_config
from eqco_jax.core.errors import UserError
from eqco_jax.program.files import workdir as workdir_lib
from eqco_jax.program.files.run_files import Progress


def test_every_path_of_a_run_is_the_workdirs(tmp_path):
  workdir = workdir_lib.Workdir(tmp_path)
  assert (workdir.checkpoints, workdir.damaged_checkpoints,
          workdir.lease_file, workdir.events, workdir.profiles,
          workdir.file_list("train/a")) == (
              tmp_path / "checkpoints", tmp_path / "damaged_checkpoints",
              tmp_path / "lease.json", tmp_path,
              tmp_path / "plugins" / "profile",
              tmp_path / "file_lists" / "train__a.json")
  assert str(workdir) == str(tmp_path)
  remote = workdir_lib.Workdir("gs://bucket/run")
  assert str(remote.checkpoints) == "gs://bucket/run/checkpoints"


def test_a_run_config_reads_back(tmp_path):
  config = load_config("quickstart.py", "tiny")
  workdir = workdir_lib.Workdir(tmp_path)
  workdir.write_run_config(config)
  as_json = lambda c: json.loads(c.to_json_best_effort())
  assert as_json(workdir.read_run_config()) == as_json(config)


def test_a_missing_run_says_what_to_point_at(tmp_path):
  with pytest.raises(UserError) as error:
    workdir_lib.Workdir(tmp_path).read_run_config(flag="--workdir")
  assert str(error.value) == (
      f"{tmp_path}/config.json does not exist; point --workdir at the "
      "--workdir of a pretraining run.")
  with pytest.raises(UserError, match=r"^config.pretrain_workdir is not set; "
                     r"pass --config.pretrain_workdir=DIR of a pretraining "
                     r"run\.$"):
    workdir_lib.of_run(None)


def test_skipped_records_are_kept_per_process_and_counted_once(tmp_path):
  directory = workdir_lib.Workdir(str(tmp_path))
  skipped = directory.skipped_records(process_index=1)
  assert skipped.count(100) == 0
  skipped.add(3, ["shard-0__7"])
  skipped.add(9, ["shard-1__2", "shard-1__5"])
  name = directory.skipped_records_name(process_index=1)
  assert name == "skipped_records.process_1.json"
  directory.write_run_file(name, skipped.to_json())
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


def test_progress_reads_back(tmp_path):
  directory = workdir_lib.Workdir(str(tmp_path))
  assert directory.read_progress() == Progress()
  progress = Progress(
      step=8, first_interval={"grad_norm": 2.5}, last_interval={"loss": 7.0},
      timed_steps=4, timed_seconds=1.5,
      final_evaluation={"pretrained": {"knn_top1": 0.5}})
  directory.write_progress(progress)
  assert directory.read_progress() == progress
  with pytest.raises(ValueError):  # records are strict JSON: no NaN
    directory.write_progress(Progress(
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
    ("progress.json", '[8]', "progress", "is damaged (a list, not an object"),
    ("progress.json", '{"step": \xff}', "progress",
     "not valid JSON: 'utf-8' codec can't decode byte 0xff"),
    ("skipped_records.process_1.json", '{"3": ["shard-0__7"', "skipped",
     "and the rest of the workdir cannot rebuild it: restore it from a copy, "
     "or move it aside and run the same command again (losing the count of "
     "the unreadable records it listed)."),
    ("skipped_records.process_1.json", '["shard-0__7"]', "skipped",
     "is damaged (a list, not records by step), and the rest"),
    ("config.json", '{"method": "si', "config",
     "; run that workdir's pretraining command again (it writes config.json "
     "at every start, and a finished run only rewrites what is missing), "
     "then this one."),
])
def test_a_damaged_run_file_is_rebuilt_or_refused_in_one_sentence(
    tmp_path, name, content, read, expected):
  """Truncated, not UTF-8, or of the wrong shape: the summary is made again
  (a warning); any other run file stops the run in one sentence naming
  it."""
  (tmp_path / name).write_bytes(content.encode("latin-1"))
  directory = workdir_lib.Workdir(str(tmp_path))
  readers = {
      "summary": lambda: directory.read_run_file(workdir_lib.SUMMARY),
      "progress": directory.read_progress,
      "skipped": lambda: directory.skipped_records(process_index=1),
      "config": directory.read_run_config,
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


def test_a_run_file_that_cannot_be_written_is_one_sentence(tmp_path):
  directory = workdir_lib.Workdir(tmp_path)
  (tmp_path / "progress.json").mkdir()  # (root writes to read-only files)
  with pytest.raises(UserError) as error:
    directory.write_run_file("progress.json", {"step": 1})
  message = str(error.value)
  assert message.startswith(f"cannot write {tmp_path}/progress.json (")
  assert message.endswith("run the same command again: it resumes from "
                          "the newest checkpoint.") and "\n" not in message


def test_a_file_list_is_made_by_process_0_and_read_by_the_others(tmp_path):
  workdir = workdir_lib.Workdir(tmp_path)
  said, listed = [], []

  def make():
    listed.append(1)
    return ["a/1.jpg", "b/2.jpg"]

  agree = lambda text: said.append(text) or said[0]
  # Process 0 lists and writes; another process reads its list.
  assert workdir.keep_file_list("train", make, process_index=0,
                                agree=agree) == ["a/1.jpg", "b/2.jpg"]
  assert workdir.keep_file_list("train", make, process_index=1,
                                agree=agree) == ["a/1.jpg", "b/2.jpg"]
  assert (listed, said) == ([1], ["", ""])

  def fail():
    raise UserError("No images in /data/val.")

  said.clear()
  for index in (0, 1):  # process 0's sentence, on every process
    with pytest.raises(UserError, match=r"^No images in /data/val\.$"):
      workdir.keep_file_list("val", fail, process_index=index, agree=agree)
  assert not (tmp_path / "file_lists" / "val.json").exists()
