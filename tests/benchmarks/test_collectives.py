"""The compiled step moves no more data than data parallelism needs: one
gradient all-reduce, BatchNorm statistics in one reduction per layer and
pass, and no image-sized collective (Shuffle BN moves statistics, not images).
"""


import jax
import pytest

from benchmarks import collectives
from helpers import ROOT

# ResNet-18 at 112, 64 images on 8 devices: one float32 view is 9.6 MB, a
# fifth of the 50 MB of parameters, so moving it would show.
SIZE, BATCH, DEVICES = 112, 64, 8


def test_parser_reads_collectives_and_their_bytes():
  hlo = """
  %all-reduce.1 = f32[64,3]{1,0} all-reduce(f32[64,3]{1,0} %x), to_apply=%add
  %ar = (f32[2]{0}, bf16[4,4]{1,0}) all-reduce-start(%a, %b), to_apply=%add
  %all-gather.2 = s32[16]{0} all-gather(s32[2]{0} %y), dimensions={0}
  %add.3 = f32[64,3]{1,0} add(f32[64,3]{1,0} %p, f32[64,3]{1,0} %q)
  """
  assert collectives.collectives(hlo) == [
      ("all-reduce", 64 * 3 * 4), ("all-reduce", 2 * 4 + 16 * 2),
      ("all-gather", 16 * 4)]


def _measure(method: str) -> dict:
  args = collectives.parse_args([
      f"--config={ROOT}/configs/{method}.py:imagenet_r50",
      "--config.model=resnet18", f"--config.image_size={SIZE}",
      f"--config.batch_size={BATCH}", f"--config.eval_batch_size={BATCH}",
      *(["--config.bn_group_size=8", "--config.queue_size=4096"]
        if method == "mocov2" else [])])
  assert jax.device_count() == DEVICES
  return collectives.measure(args)


def _batch_norm_layers(method: str) -> int:
  """BatchNorm layers of the encoder: 20 in a ResNet-18, 2 in SiMo's head."""
  return 20 + (2 if method == "simo" else 0)


@pytest.mark.parametrize("method", ["simo", "mocov2"])
def test_step_sends_gradients_and_statistics_only(method):
  report = _measure(method)
  assert report["devices"] == DEVICES
  assert report["bytes_per_param_byte"] <= 1.05, report
  # Nothing near a view's size crosses devices: everything but the gradient
  # all-reduce is statistics (and MoCo's enqueued keys, 64 x 128 floats).
  view_bytes = BATCH * SIZE * SIZE * 3 * 4
  assert report["largest_bytes"][1] < view_bytes / DEVICES / 10, report
  # Key forward, query forward, query backward: one all-reduce per BatchNorm
  # layer in each, plus the gradients'.
  assert report["counts"]["all-reduce"] <= 3 * _batch_norm_layers(method) + 1
  assert set(report["counts"]) <= {"all-reduce", "all-gather"}
