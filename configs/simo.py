"""SiMo: MoCo v2 without the queue, in-batch negatives, the EqCo loss.

  python -m eqco_jax.main --config=configs/simo.py:imagenet_r50 \
      --workdir=runs/simo --config.data_dir=/data/tensorflow_datasets

Hardware: one 8-GPU host or a TPU v4-8 (batch 256: 32 a GPU, about 5 GiB
each in bfloat16); ``imagenet_r50_large``: a v4-64 to v5e-64 class pod or
4-8 GPU hosts (batch 4096, 64-128 a device).
Expected (docs/method.md, section 5; linear top-1 on ImageNet, ResNet-50):
about 68.5 for the 200-epoch EqCo run, 68.04 for ``imagenet_r50_official``
(the official code's released run), about 72 at 800 epochs. Then the
linear evaluation: ``configs/linear_eval.py``.

Variants (``--config=configs/simo.py:VARIANT``):
  imagenet_r50           docs/method.md, section 2: ResNet-50, batch 256, 255
                         in-batch negatives, EqCo alpha 65536, 200 epochs.
  imagenet_r50_800ep     the same for 800 epochs.
  imagenet_r50_official  alpha = K = 256: plain InfoNCE over the 255
                         in-batch negatives, as the released config.
  imagenet_r50_k16       EqCo with 16 negatives per query, alpha 65536.
  imagenet_r50_large     batch 4096 with LARS, for pods.
"""

from eqco_jax.core import config as config_lib

VARIANTS = {
    "imagenet_r50": {},
    "imagenet_r50_800ep": {"num_epochs": 800},
    "imagenet_r50_official": {"eqco": False},  # its alpha/K line is off
    "imagenet_r50_k16": {"num_negatives": 16, "alpha": 65536.0},
    # LARS at lr 0.3 per 256 (as BYOL's and SimCLR's), 10 warm-up epochs.
    "imagenet_r50_large": dict(batch_size=4096, optimizer="lars",
                               base_learning_rate=0.3, weight_decay=1e-6,
                               warmup_epochs=10.0, ema_momentum=0.996),
}


def get_config(variant: str = "imagenet_r50"):
  """The schema's defaults are this recipe (docs/method.md, section 2), in
  bfloat16 with the colour stage on the accelerator (a host core makes only
  about 150-190 two-view images/s with it), blur before grayscale."""
  c = config_lib.default_config()
  c.dtype = "bfloat16"
  c.augment.on_device = True
  c.augment.blur_before_grayscale = True  # the official SiMo order
  return config_lib.apply_variant(c, variant, VARIANTS, "SiMo")
