"""The quick start: SiMo with EqCo on the embedded MNIST digits, on a CPU.

  python -m eqco_jax.main --config=configs/quickstart.py --workdir=runs/quickstart

Hardware: a laptop or any CPU (2 cores: about 5 minutes); no data to fetch.
Expected (seed 0): linear top-1 0.956 and kNN top-1 0.894 on the 1,000
held-out digits, against 0.503 and 0.431 for the same ResNet-10 at random
initialisation; final loss 6.98 (the README's quick start has the run).

Pretrains a small ResNet-10 (3x3 stem, widths 16-128) on the 4,000 training
digits for 900 steps at batch 128, then evaluates the learned backbone and
the same backbone at random initialisation with a kNN monitor and a linear
evaluation on features extracted once.

Variants (``--config=configs/quickstart.py:VARIANT``):
  default         the above.
  mocov2          MoCo v2's quick start: a queue, no BN in the head, lr 0.03
                  per 256, 600 steps.
  k_sweep         the K sweep's SiMo runs (experiments/k_sweep.py): width 8,
                  300 steps.
  k_sweep_mocov2  its MoCo v2 runs: ``mocov2`` at width 8.
  tiny            a few steps of a width-4 model (the tests').
"""

from eqco_jax.core import config as config_lib

# MoCo v2's own recipe where its BN-free head needs it: with SiMo's values
# (lr 0.2, zero-init residuals, m 0.95) its embeddings collapse within 40
# steps.
MOCOV2 = dict(method="mocov2", head="mlp", eqco=True, queue_size=256,
              bn_group_size=32, base_learning_rate=0.03,
              zero_init_residual=False, ema_momentum=0.99,
              num_train_steps=600)
VARIANTS = {
    "default": {},
    "mocov2": MOCOV2,
    "k_sweep": {"width": 8, "num_train_steps": 300},
    "k_sweep_mocov2": {**MOCOV2, "width": 8},
    "tiny": {"width": 4, "head_hidden_dim": 32, "head_out_dim": 16,
             "batch_size": 32, "num_train_steps": 6, "log_every_steps": 2,
             "checkpoint_every_steps": 2, "linear_eval": {"epochs": 5}},
}


def get_config(variant: str = "default"):
  c = config_lib.default_config()
  c.update(dict(
      dataset="digits", image_size=32, model="resnet10", width=16,
      small_image_stem=True, head_hidden_dim=512, batch_size=128,
      eval_batch_size=512, shuffle_buffer=4000,
      base_learning_rate=0.2,  # 0.1 at batch 128
      ema_momentum=0.95, num_train_steps=900, checkpoint_every_steps=250,
      final_eval=True))
  # Mild views suit digits: no flips, no hue or saturation on grey images,
  # no grayscale or blur; the colour stage on the device.
  c.augment.update(dict(
      crop_scale=(0.6, 1.0), crop_ratio=(0.8, 1.25), flip_prob=0.0,
      saturation=0.0, hue=0.0, grayscale_prob=0.0, blur_prob=0.0,
      on_device=True))
  # Features z-scored with the train split's statistics, then the
  # protocol's SGD at a rate that suits unit-variance inputs (lr 30 is for
  # raw ResNet-50 features).
  c.linear_eval.update(dict(standardize=True, learning_rate=0.3))
  return config_lib.apply_variant(c, variant, VARIANTS, "quick-start")
