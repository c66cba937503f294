"""Linear evaluation of a pretrained backbone (docs/method.md, section 4).

  python -m eqco_jax.main --config=configs/linear_eval.py:imagenet \
      --config.pretrain_workdir=runs/simo --workdir=runs/simo_linear

or, for a torchvision ResNet file (an official MoCo v2 or SiMo checkpoint,
supervised weights, an eqco-jax export) instead of a pretraining run:
``--config.init_from=FILE.pth --config.data_dir=...`` (ImageNet at 224
unless ``dataset`` and ``image_size`` say otherwise).

Hardware: ``imagenet``, the same as the pretraining (augmented ImageNet
images through the frozen ResNet-50 every step, 90 epochs); ``features``,
any machine that can hold the dataset's features (the quick start's digits
on a CPU: about 2 minutes).
Expected: the pretraining recipe's linear top-1 (``configs/simo.py``,
``configs/mocov2.py``): 68.04 for the official SiMo run.

Reads the newest checkpoint of ``pretrain_workdir`` (its ``config.json``
says which model it was), freezes the online backbone with BN in inference
mode, and trains one linear layer: SGD lr 30, momentum 0.9, no weight
decay, batch 256, 90 epochs with x0.1 at 60 and 80.

Variants (``--config=configs/linear_eval.py:VARIANT``):
  imagenet  the protocol itself: augmented images every step, checkpointed.
  features  features extracted once, then the layer trained on them.
"""

import ml_collections

from eqco_jax.core import config as config_lib

VARIANTS = {"imagenet": {}, "features": {"precompute_features": True}}


def get_config(variant: str = "imagenet"):
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
  # Data fields left None (or ()) are the pretraining run's.
  for field, kind in (("dataset", str), ("data_dir", str), ("image_size", int),
                      ("eval_train_split", str), ("eval_test_split", str)):
    c[field] = ml_collections.FieldReference(None, field_type=kind)
  c.mean = ()
  c.std = ()
  c.eval_batch_size = 256
  return config_lib.apply_variant(c, variant, VARIANTS, "linear-evaluation")
