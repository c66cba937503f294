"""The benchmark scripts run end to end and end with one JSON line (tiny sizes)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def last_json_line(args, env=None):
  result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_step_throughput_reports_rate_and_flops():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  report = last_json_line(
      ["benchmarks.step_throughput", "--method=mocov2", "--model=resnet10",
       "--width=4", "--small_image_stem", "--batch_size=16",
       "--image_size=16", "--dtype=float32", "--steps=2", "--warmup=1"], env)
  assert report["devices"] == 2 and report["method"] == "mocov2"
  assert report["images_per_sec"] > 0 and report["step_time_s"] > 0
  # Two encoder forwards and one backward of a width-4 ResNet-10 at 16x16:
  # a few MFLOPs per image, certainly not zero and not GFLOPs.
  assert 1e-4 < report["gflops_per_image"] < 0.1
  assert report["mfu"] is None  # no known peak for a CPU


def test_input_pipeline_benchmark_compares_with_bare_decoding(tmp_path):
  report = last_json_line(
      ["benchmarks.input_pipeline", "--num_images=16", "--batch_size=8",
       "--image_size=64", "--batches=2", "--warmup=1", "--repeats=1",
       f"--cache_dir={tmp_path}"])
  assert report["views_per_sec"] > 0 and report["decode_crop_views_per_sec"] > 0
  assert report["cores"] >= 1


def test_accelerator_check_runs_every_step_and_prints_its_table():
  env = dict(os.environ, PYTHON=sys.executable)
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
      ["bash", os.path.join(ROOT, "benchmarks", "accelerator_check.sh"),
       "--tiny", "--steps=1"], cwd=ROOT, env=env, capture_output=True,
      text=True, timeout=400)
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


def test_accelerator_check_asks_for_the_ml_collections_wheel(tmp_path):
  # An interpreter without ml_collections: a venv with nothing installed.
  subprocess.run([sys.executable, "-m", "venv", "--without-pip",
                  str(tmp_path / "bare")], check=True)
  env = dict(os.environ, PYTHON=str(tmp_path / "bare" / "bin" / "python"))
  result = subprocess.run(
      ["bash", os.path.join(ROOT, "benchmarks", "accelerator_check.sh"),
       f"--wheels={tmp_path}"], cwd=ROOT, env=env, capture_output=True,
      text=True, timeout=60)
  assert result.returncode == 1
  assert result.stderr.strip() == (
      f"ml_collections is not installed and no ml_collections-*.whl is in "
      f"{tmp_path}/: run 'pip download --no-deps ml-collections==1.1.0 -d "
      f"{tmp_path}/' where a registry is reachable, then copy it here.")
