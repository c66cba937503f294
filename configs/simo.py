"""SiMo (MoCo v2 without the queue, in-batch negatives, EqCo loss).

Variants: ``--config=configs/simo.py:VARIANT`` with VARIANT one of
  imagenet_r50        docs/method.md, section 2: ResNet-50, batch 256, 255
                      in-batch negatives, EqCo alpha 65536, 200 epochs (the
                      default).
  imagenet_r50_800ep  the same for 800 epochs.
  imagenet_r50_official  the official SiMo code's released config, which gave
                      68.04: alpha = K = 256, i.e. plain InfoNCE over the 255
                      in-batch negatives.
  imagenet_r50_k16    EqCo with 16 negatives per query, alpha 65536.
  imagenet_r50_large  batch 4096 with LARS, for pods.
  cifar10_r18         CIFAR-10, ResNet-18 with the small-image stem.
  runlocal            a few steps of a tiny model on the embedded digits.
"""

from eqco_jax.core import config as config_lib

# Every VARIANT of --config=FILE:VARIANT: what it changes in imagenet_r50.
VARIANTS = {
    "imagenet_r50": {},
    "imagenet_r50_800ep": {"num_epochs": 800},
    # alpha = K: the released config's alpha/K line is off.
    "imagenet_r50_official": {"eqco": False},
    "imagenet_r50_k16": {"num_negatives": 16, "alpha": 65536.0},
    "imagenet_r50_large": config_lib.large_batch_recipe,
    "cifar10_r18": lambda c: config_lib.small_image_recipe(
        c, dataset="cifar10", model="resnet18"),
    "runlocal": config_lib.runlocal_recipe,
}


def imagenet_r50():
  c = config_lib.accelerator_recipe(config_lib.default_config())
  c.augment.blur_before_grayscale = True  # the official SiMo order
  return c


def get_config(variant: str = "imagenet_r50"):
  """Returns the SiMo config of ``variant``."""
  return config_lib.apply_variant(imagenet_r50(), variant, VARIANTS, "SiMo")
