"""The pretraining config: every field, its default, and the checks run before
anything compiles. Recipes in ``configs/`` start from :func:`default_config`."""

from __future__ import annotations

import ml_collections

from eqco_jax import datasets
from eqco_jax import input_pipeline
from eqco_jax.errors import UserError
from eqco_jax.methods import METHODS
from eqco_jax.models import HEADS, MODELS

DATASETS = datasets.supported()
DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("sgd", "lars")


def default_config() -> ml_collections.ConfigDict:
  """SiMo with EqCo on ImageNet, ResNet-50, batch 256: SPEC.md section 2."""
  c = input_pipeline.default_config()  # the data fields, set below
  # Method.
  c.method = "simo"  # simo | mocov2
  c.temperature = 0.2
  c.eqco = True  # False: plain InfoNCE (alpha = K), whatever alpha says.
  c.alpha = 65536.0  # EqCo's fixed "equivalent" number of negatives.
  # K: SiMo uses K of the B-1 in-batch keys, MoCo v2 K of its queue's
  # entries (one random subset per step, shared by all queries); None = all.
  c.num_negatives = None
  c.symmetric = False  # SiMo: both views as queries, the two losses averaged.
  c.momentum = 0.999  # EMA of the key encoder.
  c.queue_size = 65536  # MoCo v2: the queue's length (K unless num_negatives).
  c.shuffle_bn = True  # MoCo v2: Shuffle BN on the key encoder.
  # Model.
  c.model = "resnet50"
  c.width = 64
  c.small_image_stem = False
  c.zero_init_residual = True
  c.head = "simo"  # simo | mocov2
  c.head_hidden_dim = 2048
  c.head_out_dim = 128
  c.bn_group_size = None  # None: BN over the global batch (SyncBN).
  c.dtype = "float32"  # compute dtype; params and statistics stay float32.
  c.remat = False  # recompute block activations in backward (saves memory)
  # Optimisation.
  c.optimizer = "sgd"  # sgd | lars
  c.batch_size = 256  # global, over all devices and processes.
  c.base_learning_rate = 0.03  # per 256 images.
  c.warmup_steps = 10
  c.weight_decay = 1e-4
  c.sgd_momentum = 0.9
  c.num_epochs = 200
  c.num_train_steps = -1  # > 0 overrides num_epochs.
  c.seed = 0
  # Data (see input_pipeline.default_config for every field).
  c.dataset = "imagenet2012"
  c.image_size = 224
  c.eval_batch_size = 256
  c.shuffle_buffer = 16384
  # Loop.
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.eval_every_steps = -1  # kNN monitor; -1 = never.
  c.knn_k = 20
  c.knn_temperature = 0.07
  # After pretraining: kNN and linear probe of the learned backbone and of the
  # same backbone at random initialisation (small datasets; features are
  # extracted once). ImageNet uses configs/linear_eval.py instead.
  c.final_eval = False
  c.final_eval_baseline = True  # also evaluate the random-init backbone
  c.linear_probe = ml_collections.ConfigDict(dict(
      epochs=90, batch_size=256, learning_rate=30.0, momentum=0.9,
      weight_decay=0.0, decay_epochs=(60, 80), standardize=False))
  return c


def small_image_recipe(c: ml_collections.ConfigDict, *, dataset: str,
                       model: str) -> ml_collections.ConfigDict:
  """Turns an ImageNet recipe into the usual 32x32 one (CIFAR-style).

  Small-image stem, batch 512, lr 0.06 per 256, weight decay 5e-4, EMA 0.99,
  no blur, 200 epochs, kNN monitor every 5 epochs, final kNN + linear probe.
  """
  c.dataset = dataset
  c.model = model
  c.small_image_stem = True
  c.image_size = 32
  c.head_hidden_dim = 512
  c.batch_size = 512
  c.eval_batch_size = 512
  c.base_learning_rate = 0.06
  c.weight_decay = 5e-4
  c.momentum = 0.99
  c.num_epochs = 200
  c.augment.crop_scale = (0.2, 1.0)
  c.augment.blur_prob = 0.0
  c.eval_every_steps = 5 * 97  # about 5 epochs of CIFAR at batch 512
  c.final_eval = True
  return c


def loss_alpha(config: ml_collections.ConfigDict) -> float | None:
  """The ``alpha`` the loss gets: None (plain InfoNCE) unless EqCo is on."""
  return config.alpha if config.get("eqco", True) else None


def _fail(field: str, value, allowed: str) -> None:
  raise UserError(f"config.{field}={value!r} is not allowed: {allowed}.")


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises UserError naming the field, the value and what is allowed.

  Runs before anything is compiled or any data is read.
  """
  c = config
  if c.method not in METHODS:
    _fail("method", c.method, f"use one of {METHODS}")
  if c.model not in MODELS:
    _fail("model", c.model, f"use one of {MODELS}")
  if c.head not in HEADS:
    _fail("head", c.head, f"use one of {HEADS}")
  if c.dataset not in DATASETS:
    _fail("dataset", c.dataset, f"use one of {DATASETS}")
  if c.dtype not in DTYPES:
    _fail("dtype", c.dtype, f"use one of {DTYPES}")
  if c.optimizer not in OPTIMIZERS:
    _fail("optimizer", c.optimizer, f"use one of {OPTIMIZERS}")
  if not isinstance(c.batch_size, int) or c.batch_size < 2:
    _fail("batch_size", c.batch_size, "use an integer >= 2")
  for field in ("batch_size", "eval_batch_size"):
    if c[field] % num_devices:
      _fail(field, c[field],
            f"it must be divisible by the {num_devices} devices")
  if not c.temperature or c.temperature <= 0:
    _fail("temperature", c.temperature, "use a value > 0 (the paper: 0.2)")
  if c.alpha is not None and c.alpha <= 0:
    _fail("alpha", c.alpha,
          "use a value > 0 (or eqco=False for plain InfoNCE)")
  if not 0.0 <= c.momentum < 1.0:
    _fail("momentum", c.momentum, "use a value in [0, 1) such as 0.999")
  if c.base_learning_rate <= 0:
    _fail("base_learning_rate", c.base_learning_rate, "use a value > 0")
  if c.num_train_steps <= 0 and c.num_epochs <= 0:
    _fail("num_epochs", c.num_epochs,
          "use a value > 0 or set num_train_steps > 0")
  if c.width < 1:
    _fail("width", c.width, "use a positive integer")
  if c.method == "simo":
    if c.num_negatives is not None and not (
        1 <= c.num_negatives <= c.batch_size - 1):
      _fail("num_negatives", c.num_negatives,
            f"use 1..{c.batch_size - 1} (batch_size - 1) or None for all")
  else:
    if c.symmetric:
      _fail("symmetric", c.symmetric, "the symmetric loss is a SiMo switch")
    if not c.queue_size or c.queue_size < c.batch_size or (
        c.queue_size % c.batch_size):
      _fail("queue_size", c.queue_size,
            f"it must be a positive multiple of batch_size={c.batch_size}")
    if c.num_negatives is not None and not (
        1 <= c.num_negatives <= c.queue_size):
      _fail("num_negatives", c.num_negatives,
            f"use 1..{c.queue_size} (queue_size) or None for the whole queue")
  if c.bn_group_size is not None:
    if c.bn_group_size < 2 or c.batch_size % c.bn_group_size:
      _fail("bn_group_size", c.bn_group_size,
            f"use a divisor >= 2 of batch_size={c.batch_size}, or None")
  if c.eval_every_steps != -1 and c.eval_every_steps <= 0:
    _fail("eval_every_steps", c.eval_every_steps, "use -1 (never) or > 0")
  for field in ("log_every_steps", "checkpoint_every_steps"):
    if c[field] <= 0:
      _fail(field, c[field], "use a positive number of steps")
  if c.image_size < 8:
    _fail("image_size", c.image_size, "use at least 8 pixels")
