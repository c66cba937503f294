"""MoCo v2, the baseline of the paper, with EqCo as an option.

Variants: ``--config=configs/mocov2.py:VARIANT`` with VARIANT one of
  imagenet_r50        SPEC.md section 3: ResNet-50, queue 65536, plain InfoNCE
                      (alpha = K), per-GPU BN of 32 with Shuffle BN, 200 epochs.
  imagenet_r50_eqco   the same with EqCo, alpha 65536 (equal to K here).
  imagenet_r50_k16    EqCo with 16 queue entries per query, alpha 65536.
  imagenet_r50_large  batch 4096 with LARS, for pods.
  cifar10_r18         CIFAR-10, ResNet-18 with the small-image stem.
  runlocal            a few steps of a tiny model on the embedded digits.
"""

from eqco_jax import config as config_lib


# Every VARIANT of --config=FILE:VARIANT.
VARIANTS = ("imagenet_r50", "imagenet_r50_eqco", "imagenet_r50_k16",
            "imagenet_r50_large", "cifar10_r18", "runlocal")


def imagenet_r50():
  c = config_lib.default_config()
  c.method = "mocov2"
  c.head = "mocov2"
  c.eqco = False  # plain InfoNCE, as MoCo v2
  c.queue_size = 65536
  c.shuffle_bn = True
  c.bn_group_size = 32  # per-GPU BN of the 8 x 32 recipe
  c.augment.blur_before_grayscale = False
  # Colour jitter, grayscale and blur on the accelerator: a host with 16 cores
  # makes 150-190 two-view images/s per core with them (README,
  # Benchmarks), too few for a fast accelerator; the host then only decodes,
  # crops and flips.
  c.augment.on_device = True
  # torchvision's ResNet-50 as MoCo v2 builds it: residual BN scales start at
  # one (SiMo's recipe starts them at zero).
  c.zero_init_residual = False
  c.dtype = "bfloat16"
  return c


def get_config(variant: str = "imagenet_r50"):
  """Returns the MoCo v2 config of ``variant``."""
  c = imagenet_r50()
  if variant == "imagenet_r50":
    pass
  elif variant == "imagenet_r50_eqco":
    c.eqco = True
    c.alpha = 65536.0
  elif variant == "imagenet_r50_k16":
    c.eqco = True
    c.alpha = 65536.0
    c.num_negatives = 16
  elif variant == "imagenet_r50_large":
    config_lib.large_batch_recipe(c)
  elif variant == "cifar10_r18":
    config_lib.small_image_recipe(c, dataset="cifar10", model="resnet18")
    c.queue_size = 4096
    c.bn_group_size = 64
  elif variant == "runlocal":
    config_lib.runlocal_recipe(c)
    c.queue_size = 256
    c.bn_group_size = 8
  else:
    raise ValueError(f"unknown MoCo v2 variant {variant!r}; see "
                     "configs/mocov2.py.")
  return c
