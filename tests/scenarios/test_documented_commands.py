"""Every command of README.md and of the launchers' headers runs as a user
types it, with small overrides appended (a handful of steps, a tiny model),
against real-shaped data: the embedded digits, and an ImageNet prepared by
the real ``imagenet2012`` TFDS builder from tars of real JPEGs.

A command added to the README or a launcher header without a case here fails
``test_every_documented_command_has_a_case``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
import pickle
import re
import shlex
import signal

import pytest

import documented as docs
from documented import documented
from helpers import ROOT, TINY_RECIPE, checkpoint_steps, environment
from helpers import xla_flags

# Each documented command (a regex over it) and the test that runs it.
CASES = {
    r"pip install -c constraints.txt -e '\.\[train,digits\]' && python -m "
    r"eqco_jax\.main --config=configs/quickstart\.py --workdir=runs/quickstart":
        "conftest.quickstart_as_documented (scenarios/test_pretraining)",
    r"pip install -c constraints.txt -e '\.\[train,digits,plots,test\]' && "
    r"python -m pytest -q": "test_the_test_command_is_what_ci_runs",
    # Needs PyPI for the oldest releases; offline, test_install runs the same
    # check in a fresh environment with the pinned ones.
    r"python -m venv /tmp/oldest && /tmp/oldest/bin/pip install -c "
    r"constraints-oldest\.txt \. && /tmp/oldest/bin/python "
    r"tests/check_core\.py": "test_install (pinned versions, offline)",
    r"python -m eqco_jax\.main --config=configs/simo\.py:imagenet_r50 "
    r"--workdir=runs/simo --config\.data_dir=\S+":
        "test_imagenet_pretraining_then_linear_eval",
    r"python -m eqco_jax\.main --config=configs/linear_eval\.py:imagenet "
    r"--config\.pretrain_workdir=runs/simo --workdir=runs/simo_linear":
        "test_imagenet_pretraining_then_linear_eval",
    r"python -m eqco_jax\.export --workdir=runs/simo --out=simo_r50\.safetensors":
        "test_imagenet_pretraining_then_linear_eval",
    r"python -m eqco_jax\.export --workdir=runs/simo --format=detectron2 "
    r"--out=simo_r50\.pkl": "test_imagenet_pretraining_then_linear_eval",
    r"python -m eqco_jax\.main --config=configs/linear_eval\.py:imagenet "
    r"--config\.init_from=moco_v2_800ep_pretrain\.pth\.tar "
    r"--config\.data_dir=\S+ --workdir=runs/mocov2_official_linear":
        "test_imagenet_pretraining_then_linear_eval",
    r"python -m eqco_jax\.main --config=configs/simo\.py:imagenet_r50 "
    r"--config\.dataset=image_folder --config\.data_dir=\S+ "
    r"--workdir=runs/simo_folder": "scenarios/test_image_folder",
    r"python -m eqco_jax\.main --config=configs/simo\.py:imagenet_r50 "
    r"--config\.dataset=image_folder --config\.data_dir=\S+ "
    r"--workdir=runs/folder_laptop .*": "scenarios/test_image_folder",
    r"python -m eqco_jax\.main --config=configs/linear_eval\.py:imagenet "
    r"--config\.pretrain_workdir=runs/simo_folder "
    r"--workdir=runs/simo_folder_linear": "scenarios/test_image_folder",
    r"python -m eqco_jax\.main --config=configs/simo\.py:imagenet_r50 "
    r"--config\.dataset=tfds:oxford_flowers102 --config\.data_dir=\S+ "
    r"--workdir=runs/simo_flowers": "scenarios/test_image_folder",
    r"python -m benchmarks\.input_pipeline": "test_benchmark_commands",
    r"python -m benchmarks\.step_throughput .*": "test_benchmark_commands",
    r"python -m benchmarks\.collectives .*": "test_benchmark_commands",
    r"python -m benchmarks\.input_wait": "test_benchmark_commands",
    r"python -m benchmarks\.preemption .*": "test_the_preemption_benchmark",
    r"python -m benchmarks\.reader_stalls": "test_benchmark_commands",
    r"benchmarks/accelerator_check\.sh": "test_the_device_check",
    r"python -m experiments\.k_sweep --workdir=runs/k_sweep":
        "test_the_k_sweep",
    r"launch/gpu_host\.sh .*": "test_launch",
    r"launch/local_processes\.sh .*": "test_multiprocess",
    r"launch/multinode\.sh .*": "test_launch",
    r"sbatch .*launch/slurm\.sbatch .*": "test_launch (fake sbatch, srun)",
    r"launch/tpu_pod\.sh --name=.*": "test_launch (fake gcloud)",
    r"launch/tpu_pod\.sh --setup .*": "test_launch (fake gcloud, uv)",
    # What tpu_pod.sh --setup runs on every worker.
    r"bash launch/tpu_vm_setup\.sh": "test_launch (fake gcloud, uv)",
}


def test_every_documented_command_has_a_case():
  for command in docs.documented_commands():
    command = docs.drop_optional(command)
    matches = [p for p in CASES if re.fullmatch(p, command)]
    assert len(matches) == 1, (
        f"{command!r} is documented but matches {len(matches)} cases: add "
        "one to CASES in tests/scenarios/test_documented_commands.py")


# A commit hash (7 to 40 hex digits, letters and digits both): history,
# which belongs in commit messages.
COMMIT = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")


def test_the_readme_is_a_short_guide_and_no_page_a_history():
  readme = pathlib.Path(ROOT, "README.md").read_text()
  assert len(readme.splitlines()) <= 300
  for path in docs.documentation():
    text = path.read_text()
    assert not COMMIT.findall(text), (path.name, COMMIT.findall(text))
    assert not re.findall(r"this round|this session|the code before", text,
                          flags=re.I), path.name


def test_the_test_command_is_what_ci_runs():
  ci = pathlib.Path(ROOT, ".ci", "run").read_text().strip().splitlines()[-1]
  assert ci == documented(r"pip install -c constraints.txt -e "
                          r"'\.\[train,digits,plots,test\]' && python -m "
                          r"pytest -q")


# ----------------------------------------------------------------- ImageNet.


@pytest.fixture(scope="module")
def imagenet_sandbox(tmp_path_factory, imagenet_manual_dir):
  return docs.make_sandbox(tmp_path_factory.mktemp("imagenet"))


def test_imagenet_pretraining_then_linear_eval(imagenet_sandbox,
                                               imagenet_manual_dir):
  sandbox, tfds_dir = imagenet_sandbox, imagenet_sandbox / "tfds"
  pretrain = documented(r"python -m eqco_jax\.main "
                        r"--config=configs/simo\.py:imagenet_r50 "
                        r"--workdir=runs/simo --config\.data_dir=\S+")
  # The first run prepares the dataset from the tars (config.download with
  # manual_dir: the real imagenet2012 builder, offline).
  result = docs.shell(
      " ".join([pretrain, *TINY_RECIPE, f"--config.data_dir={tfds_dir}",
                "--config.download=True",
                f"--config.manual_dir={imagenet_manual_dir}"]),
      sandbox, env=environment(2))
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tfds_dir / "imagenet2012" / "5.1.0" / "dataset_info.json").exists()
  summary = json.loads((sandbox / "runs/simo/summary.json").read_text())
  assert (summary["dataset"], summary["model"], summary["steps"],
          summary["num_negatives"], summary["num_devices"]) == (
              "imagenet2012", "resnet18", 4, 7, 2)
  assert checkpoint_steps(sandbox / "runs/simo") == [2, 4]

  linear = documented(r"python -m eqco_jax\.main "
                      r"--config=configs/linear_eval\.py:imagenet "
                      r"--config\.pretrain_workdir=runs/simo "
                      r"--workdir=runs/simo_linear")
  linear = " ".join([linear, "--config.epochs=1", "--config.batch_size=8",
                      "--config.eval_batch_size=8",
                      "--config.checkpoint_every_steps=2"])
  # A Ctrl-C as it starts (on a CPU it first says that features are
  # faster): it stops after its first step, saved, in one line, and the
  # same command resumes from there.
  stopped = docs.start_shell(linear, sandbox, env=environment(2))
  log = list(itertools.takewhile(
      lambda line: "Note: the image-level linear evaluation" not in line,
      stopped.stderr))
  stopped.send_signal(signal.SIGINT)
  log = "".join(log) + stopped.communicate(timeout=300)[1]
  assert stopped.returncode == 0, log[-3000:]
  assert "Traceback" not in log and "KeyboardInterrupt" not in log
  assert log.count("Stopped at step 1 of 3 after SIGINT; the checkpoint is "
                   "saved, run the same command to resume.") == 1, log[-3000:]
  assert checkpoint_steps(sandbox / "runs/simo_linear") == [1]
  result = docs.shell(linear, sandbox, env=environment(2))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resumed from the checkpoint of step 1." in result.stderr
  report = json.loads((sandbox / "runs/simo_linear/linear_eval.json")
                      .read_text())
  assert report["pretrain_step"] == 4
  assert 0.0 <= report["top1"] <= report["top5"] <= 1.0
  assert "linear evaluation: top-1" in result.stdout
  # 24 training images at batch 8: 3 steps; checkpoints at 2 and at the end.
  assert checkpoint_steps(sandbox / "runs/simo_linear") == [2, 3]

  # The backbone leaves as torchvision's ResNet-18 and detectron2's pickle.
  for pattern in (r"python -m eqco_jax\.export --workdir=runs/simo "
                  r"--out=simo_r50\.safetensors",
                  r"python -m eqco_jax\.export --workdir=runs/simo "
                  r"--format=detectron2 --out=simo_r50\.pkl"):
    result = docs.shell(documented(pattern), sandbox, env=environment(1))
    assert result.returncode == 0, result.stderr[-3000:]
  import torch  # pylint: disable=g-import-not-at-top
  import torch_models  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  exported = load_file(str(sandbox / "simo_r50.safetensors"))
  model = torch_models.import_torchvision().models.resnet18()
  loaded = model.load_state_dict(
      {k: torch.from_numpy(v) for k, v in exported.items()}, strict=False)
  assert sorted(loaded.missing_keys) == ["fc.bias", "fc.weight"]
  assert not loaded.unexpected_keys
  # The README's torchvision snippet, as written but for the architecture
  # (this run's is ResNet-18), beside the CPU torch of the test extra.
  snippet = documented_python("torchvision.models.resnet50()")
  exec(compile(snippet.replace("resnet50()", "resnet18()").replace(  # pylint: disable=exec-used
      '"simo_r50.safetensors"', repr(str(sandbox / "simo_r50.safetensors"))),
      "README.md", "exec"), {})
  detectron2 = pickle.loads((sandbox / "simo_r50.pkl").read_bytes())
  assert detectron2["matching_heuristics"] is True
  assert "res5.1.conv2.norm.running_var" in detectron2["model"]

  # The official MoCo v2 checkpoint's layout (module.encoder_q., a head),
  # holding this run's backbone, evaluated with the linear protocol.
  official = {f"module.encoder_q.{k}": torch.from_numpy(v)
              for k, v in exported.items()}
  official["module.encoder_q.fc.0.weight"] = torch.zeros(512, 512)
  torch.save({"epoch": 800, "arch": "resnet18", "state_dict": official},
             sandbox / "moco_v2_800ep_pretrain.pth.tar")
  command = documented(
      r"python -m eqco_jax\.main --config=configs/linear_eval\.py:imagenet "
      r"--config\.init_from=moco_v2_800ep_pretrain\.pth\.tar "
      r"--config\.data_dir=\S+ --workdir=runs/mocov2_official_linear")
  result = docs.shell(
      " ".join([command, f"--config.data_dir={tfds_dir}",
                "--config.image_size=16", "--config.epochs=1",
                "--config.batch_size=8", "--config.eval_batch_size=8"]),
      sandbox, env=environment(2))
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((sandbox / "runs/mocov2_official_linear/"
                       "linear_eval.json").read_text())
  assert (report["model"], report["init_from"]) == (
      "resnet18", "moco_v2_800ep_pretrain.pth.tar")
  assert 0.0 <= report["top1"] <= report["top5"] <= 1.0


# --------------------------------------------------------------- benchmarks.


def last_json_line(result) -> dict:
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
  return docs.make_sandbox(tmp_path_factory.mktemp("sandbox"))


def test_benchmark_commands(sandbox):
  two_devices = environment(2)
  step = documented(r"python -m benchmarks\.step_throughput .*")
  tiny = ("--config.model=resnet10 --config.width=4 "
          "--config.small_image_stem=True --config.image_size=16 "
          "--config.dtype=float32 --config.batch_size=16 "
          "--config.eval_batch_size=16")
  report = last_json_line(docs.shell(f"{step} {tiny} --steps=2 --warmup=1",
                                     sandbox, env=two_devices))
  assert report["devices"] == 2 and report["method"] == "simo"
  assert report["images_per_sec"] > 0 and report["step_time_s"] > 0
  # Two encoder forwards and one backward of a width-4 ResNet-10 at 16x16:
  # a few MFLOPs per image, certainly not zero and not GFLOPs.
  assert 1e-4 < report["gflops_per_image"] < 0.1
  assert report["mfu"] is None  # no known peak for a CPU

  pipeline = documented(r"python -m benchmarks\.input_pipeline")
  report = last_json_line(docs.shell(
      f"{pipeline} --num_images=16 --config.batch_size=8 "
      "--config.image_size=64 --batches=2 --warmup=1 --repeats=1 "
      f"--cache_dir={sandbox / 'jpegs'}", sandbox))
  assert report["views_per_sec"] > 0 and report["decode_crop_views_per_sec"] > 0
  assert report["folder_views_per_sec"] > 0
  assert report["tfrecord_views_per_sec"] > 0
  assert report["cores"] >= 1

  collectives = documented(r"python -m benchmarks\.collectives .*")
  report = last_json_line(docs.shell(
      f"{collectives} --config.model=resnet10 --config.width=4 "
      "--config.image_size=16 --config.batch_size=8 --devices=2",
      sandbox))
  assert report["devices"] == 2 and 0.9 < report["bytes_per_param_byte"] < 1.2

  input_wait = documented(r"python -m benchmarks\.input_wait")
  report = last_json_line(docs.shell(
      f"{input_wait} --config=configs/quickstart.py:tiny {tiny} --steps=4 "
      "--slowdowns=0,4", sandbox, env=two_devices))
  device_bound, input_bound = report["cases"]
  # The device never waits for a batch shorter than its queued step; with
  # batches 4 steps apart it waits about 3/4 of the time.
  assert device_bound["slowdown"] == 0 and input_bound["slowdown"] == 4
  assert device_bound["data_wait_fraction"] < input_bound["data_wait_fraction"]
  assert 0.3 < input_bound["truth"] <= 1 and 0.3 < input_bound[
      "data_wait_fraction"] <= 1

  # 4 shards of 40 records, windows of at most 64 (3 of 53 or 54), batches
  # of 8: steps 1-8 cross the edge at 53.
  reader = documented(r"python -m benchmarks\.reader_stalls")
  report = last_json_line(docs.shell(
      f"{reader} --config.batch_size=8 "
      "--config.shuffle_buffer=64 --shards=4 --records_per_shard=40 "
      f"--compute_ms=5 --windows=1 --cache_dir={sandbox / 'shards'}",
      sandbox))
  assert {k: report[k] for k in (
      "window_edges", "compute_s", "consumer_records_per_sec",
      "source_records_per_sec", "batch_size", "window", "windows_per_epoch",
      "parallel_reads")} == {
          "window_edges": 1, "compute_s": 0.04,
          "consumer_records_per_sec": 1600.0,
          "source_records_per_sec": 2400.0, "batch_size": 8, "window": 64,
          "windows_per_epoch": 3, "parallel_reads": 16}
  assert sorted(report) == sorted([
      "edge_wait_share", "other_wait_share", "edge_wait_ms_max",
      "window_edges", "first_batch_s", "compute_s",
      "consumer_records_per_sec", "source_records_per_sec",
      "source_gave_records_per_sec", "batch_size", "window",
      "windows_per_epoch", "parallel_reads"])
  assert min(report["edge_wait_share"], report["other_wait_share"],
             report["edge_wait_ms_max"]) >= 0
  # The first window (53 records) at 2,400 a second: 22 ms at least.
  assert 53 / 2400 < report["first_batch_s"] < 30
  assert report["source_gave_records_per_sec"] > 0


@pytest.mark.xdist_group("processes")  # two program processes: see conftest
def test_the_preemption_benchmark(sandbox):
  """One trial, its SIGTERM right after both processes compiled."""
  command = documented(r"python -m benchmarks\.preemption .*")
  command = command.replace("configs/quickstart.py",
                            "configs/quickstart.py:tiny")
  result = docs.shell(
      f"{command} --trials=1 "
      f"--train_seconds=0,0 --runs_dir={sandbox / 'preemption'}", sandbox,
      env=environment(1))
  assert result.returncode == 0, result.stderr[-3000:]
  trial, summary = [json.loads(line)
                    for line in result.stdout.strip().splitlines()[-2:]]
  assert trial["launcher_status"] == 0
  assert trial["stopped_steps"][0] == trial["stopped_steps"][1] is not None
  assert summary["trials"] == 1 and summary["exited_after_s"]["max"] == (
      trial["exited_after_s"])


def test_the_device_check(sandbox):
  command = documented(r"benchmarks/accelerator_check\.sh")
  # The check adds its own 8 devices with --tiny.
  env = dict(os.environ, XLA_FLAGS=xla_flags(None))
  result = docs.shell(f"{command} --tiny --steps=1", sandbox, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  header = json.loads(lines[0])
  assert header["devices"] == 8 and header["device_kind"] == "cpu"
  reports = [json.loads(line) for line in lines[1:6]]
  assert [(r["method"], r["symmetric"], r["on_device_augment"])
          for r in reports] == [
              ("supervised", False, False), ("simo", False, False),
              ("simo", True, False), ("mocov2", False, False),
              ("simo", False, True)]
  assert all(r["devices"] == 8 and r["images_per_sec"] > 0 for r in reports)
  supervised, simo, symmetric = reports[:3]
  # Cross-entropy over 1,000 classes at the start: about log(1000) = 6.9.
  assert abs(supervised["final_loss"] - 6.9) < 0.5
  # One forward and backward, against SiMo's extra key forward, and twice
  # that for the symmetric loss.
  assert (0 < supervised["gflops_per_image"] < simo["gflops_per_image"]
          < symmetric["gflops_per_image"])
  assert lines[6].split() == ["step", "images/s", "step", "ms", "GFLOP/img",
                              "MFU", "peak", "GiB"]
  assert lines[-2].startswith("SiMo / supervised images/s: ")
  ratio = json.loads(lines[-1])["simo_over_supervised"]
  assert ratio == reports[1]["images_per_sec"] / reports[0]["images_per_sec"]


def documented_python(needle: str) -> str:
  """The one ``python`` block of the README and docs/ that holds
  ``needle``."""
  found = [block for path in docs.documentation()
           for block in docs.fenced_blocks(path, "python") if needle in block]
  assert len(found) == 1, (needle, found)
  return found[0]


def test_the_loss_snippet_runs_in_a_fresh_python(tmp_path):
  """The README's loss snippet, copied into a new interpreter, prints the
  EqCo loss of random unit vectors: similarities near 0, so about
  log(1 + alpha)."""
  snippet = documented_python("in_batch_eqco(")
  result = docs.shell(f"python -c {shlex.quote(snippet)}", tmp_path,
                      env=environment(1))
  assert result.returncode == 0, result.stderr[-3000:]
  loss = float(result.stdout.strip().splitlines()[-1])
  assert abs(loss - math.log1p(65536.0)) < 0.5, loss


def test_the_k_sweep(sandbox):
  command = documented(r"python -m experiments\.k_sweep --workdir=runs/k_sweep")
  command += (" --results=results/k_sweep.json --plots=results --methods=simo "
              "--seeds=0 --ks=2 --config.width=4 --config.image_size=16 "
              "--config.num_train_steps=4 --config.batch_size=16")
  (sandbox / "results").mkdir(exist_ok=True)
  result = docs.shell(command, sandbox, env=environment(1))
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads((sandbox / "results/k_sweep.json").read_text())
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

  result = docs.shell(command, sandbox, env=environment(1))  # started again
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stderr.count("done before, skipped") == 2  # logged
  assert "| simo | 2 | " in result.stdout  # the summary table
  assert len(json.loads((sandbox / "results/k_sweep.json").read_text())) == 2
  assert (sandbox / "results/k_sweep_top1.png").stat().st_size > 1000
  assert (sandbox / "results/k_sweep_grad_norm.png").stat().st_size > 1000


# ------------------------------------------------------- files the text cites.

CITED = re.compile(
    r"(?<![\w/.-])((?:eqco_jax|tests|configs|launch|benchmarks|experiments|"
    r"docs|results)/[\w/.-]*\w|[\w-]+\.md)\b")


def test_every_file_the_readme_and_the_code_cite_is_in_the_repository():
  """The README, docs/ and every docstring and comment of the package,
  configs, launchers, benchmarks and experiments cite files of this
  repository only, by paths that exist."""
  root = pathlib.Path(ROOT)
  texts = [root / "README.md", *root.glob("docs/*.md")]
  for folder in ("eqco_jax", "configs", "launch", "benchmarks", "experiments"):
    texts += [p for p in (root / folder).rglob("*")
              if p.is_file() and "__pycache__" not in p.parts]
  missing = set()
  for path in texts:
    for cited in CITED.findall(path.read_text()):
      cited = cited.rstrip(".")
      if "*" in cited or cited.endswith(("/", ".tfevents")):
        continue
      if not (root / cited).exists() and not (
          cited.endswith(".md") and (root / "docs" / cited).exists()):
        missing.add(f"{path.relative_to(root)}: {cited}")
  assert not missing, sorted(missing)
