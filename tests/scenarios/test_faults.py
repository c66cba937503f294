"""Faults injected into checkpoints (tests/faults.py), as users met them: a
flipped bit in each data file of the newest checkpoint, in pretraining's
resume, the export and the linear evaluation of a finished run. Each ends
in one sentence and in the state an undamaged run has. (Truncated, deleted
and garbled files, and missing items: test_checkpointing.py's DAMAGES.)"""

import errno
import json
import logging
import shlex
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_file_loader

import faults
import helpers
from helpers import LONG, LONG_STEPS, LoggedWarnings, assert_same_tree
from helpers import load_state, run
from eqco_jax.core import sharding
from eqco_jax.core.errors import UserError
from eqco_jax.program.commands import cli
from eqco_jax.program.commands import export
from eqco_jax.program.commands import linear_eval
from eqco_jax.program.commands import main
from eqco_jax.program.files import checkpointing
from eqco_jax.program.files import events
from eqco_jax.program.files import run_files
from eqco_jax.program.files.run_files import Progress
from eqco_jax.program.files.workdir import CONFIG, LINEAR_EVAL, PROGRESS
from eqco_jax.program.files.workdir import SUMMARY, Workdir, prepare
from eqco_jax.program.run import train


def _bits(tree) -> list[bytes]:
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _train_states(config, seeds):
  """Train states of ``config``'s structure on one device, one per seed, of
  random values (no compilation: their shapes are traced)."""
  run = helpers.build_pretraining(config, total_steps=10)
  mesh = sharding.make_mesh(jax.devices()[:1])
  shapes = jax.eval_shape(lambda: run.initial_state(mesh))
  states = []
  for seed in seeds:
    rng = np.random.default_rng(seed)
    states.append(jax.tree.map(lambda s: jnp.asarray(
        rng.standard_normal(s.shape) if jnp.issubdtype(s.dtype, jnp.floating)
        else rng.integers(0, 100, s.shape), s.dtype), shapes))
  return states


def test_a_flipped_bit_in_each_data_file_is_found_or_changes_nothing(
    tmp_path):
  """The user's trial, in turn on every data file of the newest checkpoint
  of a real train state: where the restore reads the file, the flipped bit
  makes an array differ from its digest, the checkpoint is moved aside and
  the one before restores bit for bit; a file the restore does not read
  (an index node superseded by the merged one) leaves it bit for bit as
  saved. Never another state."""
  config = helpers.tiny_config("simo", keep_checkpoints=3)
  state, newer = _train_states(config, seeds=(0, 1))
  manager = checkpointing.create_manager(Workdir(tmp_path), config)
  checkpointing.save(manager, 2, state, config)
  checkpointing.save(manager, 4, newer, config)
  checkpointing.wait_until_saved(manager)
  step_dir = tmp_path / "checkpoints" / "4"
  kept = tmp_path / "damaged_checkpoints" / "4"
  read = {}
  for value in faults.read_values(step_dir):
    read.setdefault(value.file.name, value)
  outcomes = []
  for data in faults.data_files(step_dir):
    value = read.get(data.name)
    offset = (value.offset + value.length // 2 if value
              else data.stat().st_size // 2)
    faults.flip_bit(data, offset)
    with LoggedWarnings() as warnings:
      restored = checkpointing.restore_latest(manager, state, config)
    if value:  # found: moved aside, step 2 restored
      assert len(warnings.messages) == 1, warnings.messages
      cause = warnings.messages[0].removeprefix(
          f"The checkpoint of step 4 in {tmp_path}/checkpoints is damaged (")
      # A changed value (or, in a compressed chunk, one that no longer
      # decodes).
      assert cause.startswith((
          "Mismatch: 1 of its 185 arrays read back different from their "
          "saved digests, the first ", "ValueError: ")), cause
      assert cause.endswith(f"); it was moved to {kept} (kept for "
                            "inspection) and the run resumes from step 2.")
      assert _bits(restored) == _bits(state)
      kept.rename(step_dir)  # back, for the next file
      manager.reload()
    else:
      assert not warnings.messages, warnings.messages
      assert _bits(restored) == _bits(newer)
    faults.flip_bit(step_dir / faults.PROCESS_DATA / data.name, offset)
    outcomes.append(cause.split(":")[0] if value else "not read")
  assert len(outcomes) == len(faults.data_files(step_dir))
  assert "Mismatch" in outcomes and "not read" in outcomes, outcomes
  manager.close()


def _array_name(value: faults.Value) -> str:
  """``momentum_params/backbone/conv1/kernel`` of the stored chunk
  ``momentum_params.backbone.conv1.kernel/0.0.0.0``."""
  return value.key.split("/")[0].replace(".", "/")


def test_a_flipped_bit_in_the_newest_checkpoint_of_a_run_is_moved_aside_and_the_run_ends_as_the_uninterrupted_one(
    tmp_path, long_run):
  """The user's trial end to end: a LONG run stopped after its checkpoint
  of step 50 (the uninterrupted run's workdir as it was then: step 60
  not yet saved), a bit flipped in a momentum encoder's array of that
  checkpoint, the same command: step 50 is moved aside with one warning,
  steps 41-60 are trained again from step 40, and the run ends bit for bit
  in the uninterrupted run's state and final loss."""
  workdir = tmp_path / "run"
  shutil.copytree(long_run, workdir)
  shutil.rmtree(workdir / "checkpoints" / str(LONG_STEPS))
  (workdir / "summary.json").unlink()
  (workdir / "lease.json").unlink(missing_ok=True)
  value = faults.flip_bit_in_array(workdir / "checkpoints" / "50",
                                   "momentum_params.")
  count = len(jax.tree.leaves(load_state(long_run, LONG_STEPS)))
  log = run(workdir, *LONG).stderr
  assert (
      f"The checkpoint of step 50 in {workdir}/checkpoints is damaged "
      f"(Mismatch: 1 of its {count} arrays read back different from their "
      f"saved digests, the first {_array_name(value)}); it was moved to "
      f"{workdir}/damaged_checkpoints/50 (kept for inspection) and the run "
      "resumes from step 40.") in log
  assert "Resumed from the checkpoint of step 40." in log
  assert_same_tree(load_state(long_run, LONG_STEPS),
                   load_state(workdir, LONG_STEPS))
  final_loss = lambda w: json.loads(
      (w / "summary.json").read_text())["final_loss"]
  assert final_loss(workdir) == final_loss(long_run)


def test_the_export_and_the_linear_evaluation_of_a_run_read_past_its_damaged_newest_checkpoint(
    tmp_path, long_run):
  """Another run's checkpoints are only read: a damaged newest one is named
  in one warning and the one before is read, bit for bit as saved; a
  damaged step asked for, or no intact one, is one sentence. Nothing in
  that run is moved."""
  shutil.copytree(long_run, tmp_path / "run")
  workdir, checkpoints = Workdir(tmp_path / "run"), tmp_path / "run" / "checkpoints"
  value = faults.flip_bit_in_array(checkpoints / "60", "params.backbone.")
  config = workdir.read_run_config()
  with LoggedWarnings() as warnings:
    backbone, step = export.backbone_state(workdir, config)
    params, batch_stats, pretrain_step = linear_eval.restore_pretrained(
        workdir, sharding.make_mesh())
  cause = (f"step 60: Mismatch: 1 of its 185 arrays read back different "
           f"from their saved digests, the first {_array_name(value)}")
  assert warnings.messages == 2 * [
      f"Damaged checkpoints in {checkpoints} ({cause}) were left as they "
      "are; reading step 50, the newest intact one."]
  assert step == pretrain_step == 50
  expected, _ = export.backbone_state(Workdir(long_run), config, step=50)
  assert _bits(backbone) == _bits(expected)
  saved = load_state(long_run, 50)
  assert _bits((params, batch_stats)) == _bits(
      (saved["params"], saved["batch_stats"]))
  with pytest.raises(UserError) as error:
    export.backbone_state(workdir, config, step=60)
  assert str(error.value) == (
      f"the checkpoint of step 60 in {checkpoints} is damaged "
      f"({cause.removeprefix('step 60: ')}); read another of its steps "
      "([40, 50, 60]) or restore it from a copy.")
  for step in (40, 50):
    faults.flip_bit_in_array(checkpoints / str(step), "params.backbone.")
  with pytest.raises(UserError) as error:
    linear_eval.restore_pretrained(workdir, sharding.make_mesh())
  assert str(error.value).startswith(
      f"none of the checkpoints in {checkpoints} can be read ({cause}; "
      "step 50: Mismatch: ")
  assert str(error.value).endswith(
      "); restore them from a copy or point at another run.")
  assert sorted(p.name for p in checkpoints.iterdir()) == ["40", "50", "60"]
  assert not (tmp_path / "run" / "damaged_checkpoints").exists()


# ------------------------------------ a read-only or full workdir, by phase.

_AGAIN = ("make the workdir writable (or free space on its disk) and run the "
          "same command again: it resumes from the newest checkpoint.")
_DISKS = {errno.EROFS: "Read-only file system",
          errno.ENOSPC: "No space left on device"}


def _sentence(error: pytest.ExceptionInfo) -> str:
  message = str(error.value)
  assert "\n" not in message and message.endswith("."), message
  return message


@pytest.mark.parametrize("number", sorted(_DISKS))
def test_at_start_a_read_only_or_full_workdir_is_one_sentence(
    tmp_path, monkeypatch, number):
  """Before any work (``workdir.prepare``, which ``main`` calls before the
  heavy imports); the same command runs once the disk is fixed."""
  disk = faults.FailingDisk(tmp_path, number).install(monkeypatch)
  with pytest.raises(UserError) as error:
    prepare(tmp_path / "run")
  assert _sentence(error).startswith(
      f"cannot write to the workdir {tmp_path}/run (OSError: [Errno "
      f"{number}] {_DISKS[number]}: '{tmp_path}/run'); check that the "
      "location exists")
  disk.failing = False
  assert prepare(tmp_path / "run").root.is_dir()


@pytest.mark.parametrize("name", [CONFIG, PROGRESS, SUMMARY, LINEAR_EVAL])
def test_a_run_file_on_a_read_only_or_full_disk_is_one_sentence_and_left_as_it_was(
    tmp_path, monkeypatch, name):
  """config.json at each start, progress.json (the loop's, in the
  background, and the final evaluation's), summary.json at the end, the
  linear evaluation's result: one sentence, the file as it was."""
  workdir = Workdir(tmp_path)
  workdir.write_run_file(name, {"step": 1})
  disk = faults.FailingDisk(tmp_path, errno.ENOSPC).install(monkeypatch)
  with pytest.raises(UserError) as error:
    workdir.write_run_file(name, {"step": 2})
  assert _sentence(error).startswith(  # (the file it becomes once whole)
      f"cannot write {tmp_path}/{name} (OSError: [Errno 28] No space left "
      f"on device: '{tmp_path}/.partial.")
  assert _sentence(error).endswith(f"'); {_AGAIN}")
  disk.failing = False
  assert workdir.read_run_file(name) == {"step": 1}
  assert [p.name for p in tmp_path.iterdir()] == [name]  # no partial file


def test_the_final_evaluation_on_a_full_disk_stops_in_one_sentence_and_keeps_what_was_saved(
    tmp_path, monkeypatch):
  """Each finished part of the final evaluation is kept in progress.json as
  it ends: the first that cannot be stops the run; the same command
  evaluates only what is not kept."""
  workdir, evaluated = Workdir(tmp_path), []

  def evaluate(params, batch_stats, *, linear, check):
    evaluated.append(params)
    return {"linear_top1": float(params)}

  backbones = {"pretrained": (1, None), "baseline": (2, None)}
  disk = faults.FailingDisk(tmp_path, errno.EROFS).install(monkeypatch)
  with pytest.raises(UserError) as error:
    train._final_evaluation(backbones, evaluate, workdir, Progress(step=6))
  assert _sentence(error).startswith(f"cannot write {tmp_path}/{PROGRESS} (")
  disk.failing = False
  train._final_evaluation(backbones, evaluate, workdir, Progress(step=6))
  assert evaluated == [1, 1, 2]  # pretrained again: it was never kept
  assert workdir.read_progress().final_evaluation == {
      "pretrained": {"linear_top1": 1.0}, "baseline": {"linear_top1": 2.0}}


def test_run_files_the_loop_could_not_write_are_one_sentence_at_its_end(
    tmp_path, monkeypatch):
  """progress.json and the skipped records are written off the loop,
  tried again while it trains; what is still unwritten when training ends
  stops the run in one sentence, and what the disk takes once fixed is
  written."""
  workdir = Workdir(tmp_path)
  disk = faults.FailingDisk(tmp_path, errno.ENOSPC).install(monkeypatch)
  monkeypatch.setattr(train, "WRITES_TIMEOUT_SECS", 0.5)
  writes = run_files.BackgroundWrites(workdir.write_run_file)
  with LoggedWarnings() as warnings:
    writes.put(PROGRESS, Progress(step=4).to_json())
    with pytest.raises(UserError) as error:
      train._run_files_written(writes, workdir)
  assert _sentence(error).startswith(
      f"cannot write {tmp_path}/{PROGRESS} (OSError: [Errno 28] No space "
      f"left on device: '{tmp_path}/.partial.")
  assert _sentence(error).endswith(f"'); {_AGAIN}")
  assert warnings.messages and all(
      m.startswith(f"Could not write {PROGRESS} (UserError: ")
      for m in warnings.messages)
  disk.failing = False
  writes = run_files.BackgroundWrites(workdir.write_run_file)
  writes.put(PROGRESS, Progress(step=4).to_json())
  train._run_files_written(writes, workdir)
  assert workdir.read_progress().step == 4


@pytest.mark.parametrize("when", ["created", "written"])
def test_an_event_file_that_cannot_be_written_is_one_sentence_in_the_loop(
    tmp_path, monkeypatch, when):
  """The events are written in clu's thread: a failure there is said by
  the loop's next write or flush (raised in the loop's thread), with no
  traceback logged; what was written before stays readable."""
  disk = faults.FailingDisk(tmp_path, errno.ENOSPC,
                            failing=when == "created").install(monkeypatch)
  with LoggedWarnings(level=logging.ERROR) as errors:
    with pytest.raises(UserError) as error:
      writer = events.create_writer(Workdir(tmp_path), just_logging=False,
                                    resumed_from=0)
      writer.write_scalars(1, {"loss": 1.0})
      writer.flush()
      disk.failing = True
      writer.write_scalars(2, {"loss": 2.0})  # fails in clu's thread
      writer.flush()
  assert not errors.messages, errors.messages
  files = list(tmp_path.glob("events.out.tfevents.*"))
  assert len(files) == (when == "written")
  assert _sentence(error).startswith(
      f"cannot write the TensorBoard events file "
      f"{files[0] if files else tmp_path / 'events.out.tfevents.'}")
  assert "(OSError: [Errno 28] No space left on device" in str(error.value)
  if when == "written":  # the events before the failure, for TensorBoard
    file = files[0]
    steps = [e.step for e in event_file_loader.LegacyEventFileLoader(
        str(file)).Load() if e.summary.value]
    assert steps == [1]
  assert _sentence(error).endswith(f"); {_AGAIN}")


_FILLING = """
import pathlib, runpy, sys
sys.path.insert(0, "tests")
import faults
disk, note, *sys.argv[1:] = sys.argv[1:]
# Full once the save of step 2 is complete, before that of step 4.
faults.filling_before("eqco_jax.program.files.checkpointing:save",
                      pathlib.Path(disk), call=2, note=pathlib.Path(note),
                      first=lambda manager, *_: manager.wait_until_finished())
sys.argv[0] = "eqco_jax.main"
runpy.run_module("eqco_jax.main", run_name="__main__", alter_sys=True)
"""


def test_a_disk_that_fills_up_during_training_is_one_sentence_and_the_run_resumes_from_its_newest_checkpoint(
    tmp_path):
  """The user's trial end to end on a real disk (a 64 MB tmpfs in a mount
  namespace of its own, as in test_checkpointing.py): the quick start's
  tiny run for 6 steps, its disk full from just before the save of step 4,
  found by the save of step 6 while tensorstore's writes of step 4 are
  still in flight (which then called back into a closed event loop: a
  traceback each): the last line of the output is one sentence, there is
  no traceback, the program ends within 30 s of the disk filling up, and
  the workdir resumes from step 2 (the same command's resume from a
  checkpoint, ending as the uninterrupted run: the bit-flip test above)."""
  disk, out = tmp_path / "disk", tmp_path / "out"
  disk.mkdir()
  out.mkdir()
  workdir = disk / "run"
  command = helpers.command(workdir, "--config.num_train_steps=6",
                            "--config.final_eval=False")
  faulty = [sys.executable, "-c", _FILLING, str(disk), str(out / "filled"),
            *command[3:]]
  script = f"""
    mount -t tmpfs -o size=64m tmpfs {disk} || exit 90
    {shlex.join(faulty)} 2> {out}/fault.err
    echo $? > {out}/fault.rc; date +%s.%N > {out}/ended
    rm {disk}/filler
    cp -a {workdir} {out}/run"""
  subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c",
                  script], cwd=helpers.ROOT, env=helpers.environment(1),
                 check=True, timeout=300)
  read = lambda name: (out / name).read_text()
  log = read("fault.err")
  assert read("fault.rc").strip() == "1", log[-3000:]
  assert "Traceback" not in log, log[-3000:]
  last = log.strip().splitlines()[-1]
  assert last.startswith(
      f"error: no space left on the device of {workdir}/checkpoints while "
      "saving a checkpoint (a checkpoint takes about "), last
  assert last.endswith(
      " MB, and 0 MB are free there); free space there, or copy the workdir "
      "to a larger disk and point --workdir at it, then run the same "
      "command: it resumes from step 2, which is intact."), last
  assert float(read("ended")) - float(read("filled")) < 30
  run = Workdir(out / "run")
  saved = load_state(out / "run", 2)
  manager = checkpointing.create_manager(run, run.read_run_config())
  with LoggedWarnings() as warnings:
    restored = checkpointing.restore_latest(manager, saved,
                                            run.read_run_config())
  assert not warnings.messages, warnings.messages
  assert int(restored["step"]) == 2 and _bits(restored) == _bits(saved)
  manager.close()


# ----------------------------------------- values no run can start with.


@pytest.mark.parametrize("override, message", [
    ("seed=-1", "config.seed=-1 is not allowed"),
    ("image_size=1000000", "config.image_size=1000000 is not allowed"),
    ("eval_batch_size=1000000000", "an evaluation batch of "
     "config.eval_batch_size=1000000000 images of 32x32 needs at least "),
])
def test_a_value_no_run_can_start_with_is_one_sentence_and_leaves_no_file(
    tmp_path, override, message):
  """The program (its ``main``, in this process) stops before training, in
  one sentence, and leaves nothing in the workdir (the evaluation batch is
  measured against the devices, once the workdir is made)."""
  workdir = tmp_path / "run"
  args = cli.parse(main.define_flags, [
      f"--config={helpers.QUICK}", f"--workdir={workdir}",
      f"--config.{override}", "--num_processes=1"])  # (JAX is started)
  # What main sets for the whole process, as this process had it.
  kept = {name: getattr(jax.config, name) for name in (
      "jax_cpu_collectives_implementation", "jax_compilation_cache_dir")}
  try:
    with pytest.raises(UserError) as error:
      main.main(args)
  finally:
    for name, value in kept.items():
      jax.config.update(name, value)
  assert _sentence(error).startswith(message)
  assert not workdir.exists() or not list(workdir.iterdir())
