"""The quick start: SiMo with EqCo on the embedded MNIST digits, on the CPU.

Pretrains a small ResNet-10 (3x3 stem, widths 16-128) on the 4,000 training
digits, then evaluates the learned backbone and the same backbone at random
initialisation with a kNN monitor and a linear evaluation on the 1,000
held-out digits. Its time and accuracy on a 2-core CPU are in the README's
quick start.
"""

from eqco_jax.core import config as config_lib

# Every VARIANT of --config=FILE:VARIANT: what it changes in the default.
VARIANTS = {
    "default": {},
    # For tests: a few steps of a very small model.
    "tiny": {"width": 4, "head_hidden_dim": 32, "head_out_dim": 16,
             "batch_size": 32, "num_train_steps": 6, "log_every_steps": 2,
             "checkpoint_every_steps": 2, "linear_eval": {"epochs": 5}},
}


def quickstart():
  c = config_lib.small_image_recipe(config_lib.default_config(),
                                    dataset="digits", model="resnet10")
  c.update(dict(
      width=16, ema_momentum=0.95, batch_size=128,
      base_learning_rate=0.2,  # 0.1 at batch 128
      weight_decay=1e-4, num_train_steps=900, shuffle_buffer=4000,
      checkpoint_every_steps=250, eval_every_steps=-1))
  # Mild views suit digits: no flips, no hue/saturation on grey images, no
  # grayscale or blur; the colour stage on the device.
  c.augment.update(dict(
      crop_scale=(0.6, 1.0), crop_ratio=(0.8, 1.25), flip_prob=0.0,
      saturation=0.0, hue=0.0, grayscale_prob=0.0, on_device=True))
  # Features z-scored with the train split's statistics, then the protocol's
  # SGD at a rate that suits unit-variance inputs (lr 30 assumes raw
  # ResNet-50 features).
  c.linear_eval.update(dict(standardize=True, learning_rate=0.3))
  return c


def get_config(variant: str = "default"):
  """Returns the quick-start config of ``variant``."""
  return config_lib.apply_variant(quickstart(), variant, VARIANTS,
                                  "quick-start")
