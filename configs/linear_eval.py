"""Linear evaluation of a pretrained backbone (docs/method.md, section 4).

``python -m eqco_jax.main --config=configs/linear_eval.py:imagenet
  --config.pretrain_workdir=PRETRAIN_DIR --workdir=EVAL_DIR``

or, for a torchvision ResNet file (an official MoCo v2 or SiMo checkpoint,
supervised weights, an eqco-jax export) instead of a pretraining run:
``--config.init_from=FILE.pth --config.data_dir=...`` (ImageNet at 224
unless ``dataset`` and ``image_size`` say otherwise).

Reads the latest checkpoint of the pretraining run in ``pretrain_workdir``
(its ``config.json`` says which model it was), freezes the online backbone
with BN in inference mode, and trains one linear layer: SGD lr 30, momentum
0.9, no weight decay, batch 256, 90 epochs with x0.1 at 60 and 80.
Variants: imagenet (augmented images each step, the protocol itself) and
features (features extracted once; for small datasets).
"""

import ml_collections

from eqco_jax.core import config as config_lib

# Every VARIANT of --config=FILE:VARIANT: what it changes in the default.
VARIANTS = {"imagenet": {}, "features": {"precompute_features": True}}


def linear_eval():
  c = config_lib.linear_eval_config()  # the protocol, docs/method.md
  c.mode = "linear_eval"
  c.pretrain_workdir = ml_collections.FieldReference(None, field_type=str)
  # Or a torchvision ResNet .pth/.safetensors ('' = none): its architecture
  # is read from the file.
  c.init_from = ""
  c.precompute_features = False
  c.seed = 0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 2
  # Data fields left None are taken from the pretraining run's config.
  c.dataset = ml_collections.FieldReference(None, field_type=str)
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.image_size = ml_collections.FieldReference(None, field_type=int)
  c.eval_train_split = ml_collections.FieldReference(None, field_type=str)
  c.eval_test_split = ml_collections.FieldReference(None, field_type=str)
  c.mean = ()  # () = the pretraining run's (see config_lib.data_config)
  c.std = ()
  c.eval_batch_size = 256
  return c


def get_config(variant: str = "imagenet"):
  """Returns the linear-evaluation config of ``variant``."""
  return config_lib.apply_variant(linear_eval(), variant, VARIANTS,
                                  "linear-evaluation")
