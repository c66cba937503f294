"""eqco_jax.program.run.performance: the per-device batch note, and the
figures of a log interval."""

from helpers import load_config
from eqco_jax.program.run import performance


def test_a_per_device_batch_below_8_names_the_datasets_recipe():
  config = load_config("simo.py", "imagenet_r50")
  assert performance.per_device_batch_advice(config, num_devices=8) is None
  assert performance.per_device_batch_advice(config, num_devices=128) == (
      "the per-device batch is 2 (batch_size=256 over 128 devices), too small "
      "to keep an accelerator busy: use configs/simo.py:imagenet_r50_large "
      "(batch 4096, LARS) or a batch_size of at least 1024 with the "
      "learning-rate rule of the README's recipes per hardware.")
  large = load_config("mocov2.py", "imagenet_r50_large")
  assert performance.per_device_batch_advice(large, num_devices=256) is None
  assert "configs/mocov2.py:imagenet_r50_large" in (
      performance.per_device_batch_advice(large, num_devices=1024))
  # A dataset without a large-batch recipe is not sent to ImageNet's.
  cifar = load_config("cifar10.py", "simo_r18")
  advice = performance.per_device_batch_advice(cifar, num_devices=128)
  assert "imagenet" not in advice and "use a batch_size of at least 1024" in (
      advice)
