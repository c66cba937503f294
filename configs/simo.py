"""SiMo (MoCo v2 without the queue, in-batch negatives, EqCo loss).

Variants: ``--config=configs/simo.py:VARIANT`` with VARIANT one of
  imagenet_r50        SPEC.md section 2: ResNet-50, batch 256, 255 in-batch
                      negatives, EqCo alpha 65536, 200 epochs (the default).
  imagenet_r50_800ep  the same for 800 epochs.
  imagenet_r50_official  the official SiMo code's released config, which gave
                      68.04: alpha = K = 256, i.e. plain InfoNCE over the 255
                      in-batch negatives.
  imagenet_r50_k16    EqCo with 16 negatives per query, alpha 65536.
  imagenet_r50_large  batch 4096 with LARS, for pods.
  cifar10_r18         CIFAR-10, ResNet-18 with the small-image stem.
  runlocal            a few steps of a tiny model on the embedded digits.
"""

from eqco_jax import config as config_lib


# Every VARIANT of --config=FILE:VARIANT.
VARIANTS = ("imagenet_r50", "imagenet_r50_800ep", "imagenet_r50_official",
            "imagenet_r50_k16", "imagenet_r50_large", "cifar10_r18",
            "runlocal")


def imagenet_r50():
  c = config_lib.default_config()
  c.method = "simo"
  c.head = "simo"
  c.augment.blur_before_grayscale = True  # the official SiMo order
  # Colour jitter, grayscale and blur on the accelerator: a host with 16 cores
  # makes 150-190 two-view images/s per core with them (README,
  # Benchmarks), too few for a fast accelerator; the host then only decodes,
  # crops and flips.
  c.augment.on_device = True
  c.dtype = "bfloat16"  # bf16 compute; params, BN statistics, loss in f32.
  return c


def get_config(variant: str = "imagenet_r50"):
  """Returns the SiMo config of ``variant``."""
  c = imagenet_r50()
  if variant == "imagenet_r50":
    pass
  elif variant == "imagenet_r50_official":
    c.eqco = False  # alpha = K: the released config's alpha/K line is off
  elif variant == "imagenet_r50_800ep":
    c.num_epochs = 800
  elif variant == "imagenet_r50_k16":
    c.num_negatives = 16
    c.alpha = 65536.0
  elif variant == "imagenet_r50_large":
    config_lib.large_batch_recipe(c)
  elif variant == "cifar10_r18":
    config_lib.small_image_recipe(c, dataset="cifar10", model="resnet18")
  elif variant == "runlocal":
    config_lib.runlocal_recipe(c)
  else:
    raise ValueError(f"unknown SiMo variant {variant!r}; see configs/simo.py.")
  return c
