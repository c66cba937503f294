"""CIFAR-10 (32x32) with a ResNet-18 of the small-image stem: SiMo or
MoCo v2, both with the kNN monitor every 5 epochs and a final kNN and
linear evaluation.

  python -m eqco_jax.main --config=configs/cifar10.py:simo_r18 \
      --workdir=runs/cifar10 --config.data_dir=/data/tensorflow_datasets

Hardware: one GPU or TPU chip (batch 512; about 2 GiB in bfloat16).
Expected: not yet measured by this project (no accelerator has been lent
to it); the kNN monitor's top-1 in TensorBoard shows the run's progress.

Variants (``--config=configs/cifar10.py:VARIANT``):
  simo_r18    SiMo with EqCo, 511 in-batch negatives, 200 epochs.
  mocov2_r18  MoCo v2: a queue of 4096, plain InfoNCE, BN per 64.
"""

from eqco_jax.core import config as config_lib

VARIANTS = {
    "simo_r18": {},
    "mocov2_r18": dict(method="mocov2", head="mlp", eqco=False,
                       queue_size=4096, bn_group_size=64,
                       zero_init_residual=False),
}


def get_config(variant: str = "simo_r18"):
  """The usual 32x32 recipe: small-image stem, batch 512, lr 0.06 per 256,
  weight decay 5e-4, EMA 0.99, no blur, 200 epochs."""
  c = config_lib.default_config()
  c.update(dict(
      dataset="cifar10", image_size=32, model="resnet18",
      small_image_stem=True, head_hidden_dim=512, batch_size=512,
      eval_batch_size=512, base_learning_rate=0.06, weight_decay=5e-4,
      ema_momentum=0.99, eval_every_epochs=5.0, final_eval=True,
      dtype="bfloat16"))
  c.augment.update(dict(blur_prob=0.0, on_device=True))
  return config_lib.apply_variant(c, variant, VARIANTS, "CIFAR-10")
