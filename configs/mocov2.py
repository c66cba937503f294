"""MoCo v2, the baseline of the paper, with EqCo as an option.

Variants: ``--config=configs/mocov2.py:VARIANT`` with VARIANT one of
  imagenet_r50        docs/method.md, section 3: ResNet-50, queue 65536, plain
                      InfoNCE (alpha = K), per-GPU BN of 32 with Shuffle BN,
                      200 epochs.
  imagenet_r50_eqco   the same with EqCo, alpha 65536 (equal to K here).
  imagenet_r50_k16    EqCo with 16 queue entries per query, alpha 65536.
  imagenet_r50_large  batch 4096 with LARS, for pods.
  cifar10_r18         CIFAR-10, ResNet-18 with the small-image stem.
  runlocal            a few steps of a tiny model on the embedded digits.
"""

from eqco_jax.core import config as config_lib


def _cifar10_r18(c):
  config_lib.small_image_recipe(c, dataset="cifar10", model="resnet18")
  c.update(dict(queue_size=4096, bn_group_size=64))


def _runlocal(c):
  config_lib.runlocal_recipe(c)
  c.update(dict(queue_size=256, bn_group_size=8))


# Every VARIANT of --config=FILE:VARIANT: what it changes in imagenet_r50.
VARIANTS = {
    "imagenet_r50": {},
    "imagenet_r50_eqco": {"eqco": True, "alpha": 65536.0},
    "imagenet_r50_k16": {"eqco": True, "alpha": 65536.0,
                         "num_negatives": 16},
    "imagenet_r50_large": config_lib.large_batch_recipe,
    "cifar10_r18": _cifar10_r18,
    "runlocal": _runlocal,
}


def imagenet_r50():
  c = config_lib.accelerator_recipe(config_lib.default_config())
  c.update(dict(
      method="mocov2", head="mlp",
      eqco=False,  # plain InfoNCE, as MoCo v2
      queue_size=65536, shuffle_bn=True,
      bn_group_size=32,  # per-GPU BN of the 8 x 32 recipe
      # torchvision's ResNet-50 as MoCo v2 builds it: residual BN scales
      # start at one (SiMo's recipe starts them at zero).
      zero_init_residual=False))
  c.augment.blur_before_grayscale = False  # MoCo v2's order
  return c


def get_config(variant: str = "imagenet_r50"):
  """Returns the MoCo v2 config of ``variant``."""
  return config_lib.apply_variant(imagenet_r50(), variant, VARIANTS,
                                  "MoCo v2")
