"""MoCo v2, the paper's baseline, with EqCo as an option.

  python -m eqco_jax.main --config=configs/mocov2.py:imagenet_r50 \
      --workdir=runs/mocov2 --config.data_dir=/data/tensorflow_datasets

Hardware: one 8-GPU host (batch 256, per-GPU BN of 32 with Shuffle BN, as
MoCo's 8 x 32) or a TPU v4-8; ``imagenet_r50_large``: a v4-64 to v5e-64
class pod or 4-8 GPU hosts.
Expected (docs/method.md, section 5; linear top-1 on ImageNet, ResNet-50,
200 epochs): 67.5 for ``imagenet_r50``; with EqCo about flat as K falls to
16 (``imagenet_r50_k16``), where plain InfoNCE drops.

Variants (``--config=configs/mocov2.py:VARIANT``):
  imagenet_r50        docs/method.md, section 3: queue 65536, plain InfoNCE
                      (alpha = K), per-GPU BN of 32 with Shuffle BN.
  imagenet_r50_eqco   the same with EqCo, alpha 65536 (equal to K here).
  imagenet_r50_k16    EqCo with 16 queue entries per query, alpha 65536.
  imagenet_r50_large  batch 4096 with LARS, for pods.
"""

from eqco_jax.core import config as config_lib

VARIANTS = {
    "imagenet_r50": {},
    "imagenet_r50_eqco": {"eqco": True, "alpha": 65536.0},
    "imagenet_r50_k16": {"eqco": True, "alpha": 65536.0,
                         "num_negatives": 16},
    # LARS at lr 0.3 per 256 (as BYOL's and SimCLR's), 10 warm-up epochs.
    "imagenet_r50_large": dict(batch_size=4096, optimizer="lars",
                               base_learning_rate=0.3, weight_decay=1e-6,
                               warmup_epochs=10.0, ema_momentum=0.996),
}


def get_config(variant: str = "imagenet_r50"):
  """MoCo v2 as its paper trains it, in bfloat16 with the colour stage on
  the accelerator, grayscale before blur (MoCo v2's order)."""
  c = config_lib.default_config()
  c.dtype = "bfloat16"
  c.augment.on_device = True
  c.method = "mocov2"
  c.head = "mlp"  # Linear-ReLU-Linear with biases, no BN
  c.eqco = False  # plain InfoNCE
  c.queue_size = 65536
  c.shuffle_bn = True
  c.bn_group_size = 32  # per-GPU BN of the 8 x 32 recipe
  # torchvision's ResNet-50 as MoCo v2 builds it: residual BN scales start
  # at one (SiMo's recipe starts them at zero).
  c.zero_init_residual = False
  return config_lib.apply_variant(c, variant, VARIANTS, "MoCo v2")
