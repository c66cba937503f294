"""The quick start: SiMo with EqCo on the embedded MNIST digits, on the CPU.

Pretrains a small ResNet-10 (3x3 stem, widths 16-128) on the 4,000 training
digits, then evaluates the learned backbone and the same backbone at random
initialisation with a kNN monitor and a linear probe on the 1,000 held-out
digits. About 6 minutes on 2 CPU cores; figures in the README.
"""

from eqco_jax import config as config_lib


# Every VARIANT of --config=FILE:VARIANT.
VARIANTS = ("default", "tiny")


def get_config(variant: str = "default"):
  c = config_lib.default_config()
  c.method = "simo"
  c.head = "simo"
  c.dataset = "digits"
  c.model = "resnet10"
  c.width = 16
  c.small_image_stem = True
  c.image_size = 32
  c.head_hidden_dim = 512
  c.head_out_dim = 128
  c.dtype = "float32"
  c.temperature = 0.2
  c.alpha = 65536.0
  c.ema_momentum = 0.95
  c.batch_size = 128
  c.base_learning_rate = 0.2  # 0.1 at batch 128
  c.weight_decay = 1e-4
  c.warmup_steps = 10
  c.num_train_steps = 900
  c.eval_batch_size = 512
  c.shuffle_buffer = 4000
  # Mild views suit digits: no flips, no hue/saturation on grey images.
  c.augment.crop_scale = (0.6, 1.0)
  c.augment.crop_ratio = (0.8, 1.25)
  c.augment.flip_prob = 0.0
  c.augment.color_jitter_prob = 0.8
  c.augment.brightness = 0.4
  c.augment.contrast = 0.4
  c.augment.saturation = 0.0
  c.augment.hue = 0.0
  c.augment.grayscale_prob = 0.0
  c.augment.blur_prob = 0.0
  c.augment.on_device = True
  c.log_every_steps = 50
  c.checkpoint_every_steps = 250
  c.eval_every_steps = -1
  c.final_eval = True
  # Features z-scored with the train split's statistics, then the protocol's
  # SGD at a rate that suits unit-variance inputs (lr 30 assumes raw ResNet-50
  # features).
  c.linear_probe.standardize = True
  c.linear_probe.learning_rate = 0.3
  if variant == "tiny":  # for tests: a few steps of a very small model
    c.width = 4
    c.head_hidden_dim = 32
    c.head_out_dim = 16
    c.batch_size = 32
    c.num_train_steps = 6
    c.log_every_steps = 2
    c.checkpoint_every_steps = 2
    c.linear_probe.epochs = 5
  elif variant != "default":
    raise ValueError(f"unknown quickstart variant {variant!r}; use 'default' "
                     "or 'tiny'.")
  return c
