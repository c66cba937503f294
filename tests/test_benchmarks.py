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
