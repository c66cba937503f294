"""The pretraining config: every field, its default, the recipes built from
it, and the checks run before anything compiles. ``configs/`` starts from
:func:`default_config`.

Core layer: imports ml_collections only, so that a config can be built, and
its numbers checked, in a fraction of a second and where TensorFlow is not
installed; :func:`validate` reads the core's dicts of choices (methods,
models, heads, dtypes, optimizers), which bring in JAX, after every other
check. The data layer checks ``dataset`` and the splits when it opens the
source, which is also before anything compiles. Runs recorded under older
field names and values read through :func:`upgrade_names`.
"""

from __future__ import annotations

import difflib
import math
import os
from typing import Any, Callable, Iterable, Mapping

import ml_collections

from eqco_jax.core.errors import UserError

# The linear evaluation protocol (docs/method.md, section 4): the one place
# its defaults are written. configs/linear_eval.py and the final linear
# evaluation of a pretraining run start from it; eqco_jax.core.evaluate takes
# it field by field.
LINEAR_PROTOCOL = dict(epochs=90, batch_size=256, learning_rate=30.0,
                       momentum=0.9, weight_decay=0.0, decay_epochs=(60, 80))


def augment_config() -> ml_collections.ConfigDict:
  """MoCo v2's two-view augmentation (grayscale before blur).

  SiMo's recipe sets ``blur_before_grayscale``; small-image recipes override
  strengths and probabilities.
  """
  return ml_collections.ConfigDict({
      "crop_scale": (0.2, 1.0),
      "crop_ratio": (3.0 / 4.0, 4.0 / 3.0),
      "flip_prob": 0.5,
      "color_jitter_prob": 0.8,
      "brightness": 0.4,
      "contrast": 0.4,
      "saturation": 0.4,
      "hue": 0.1,
      "grayscale_prob": 0.2,
      "blur_prob": 0.5,
      "blur_sigma": (0.1, 2.0),
      "blur_kernel_fraction": 0.1,
      "blur_before_grayscale": False,  # True: SiMo's order.
      "on_device": False,
      "eval_crop_scale": (0.08, 1.0),  # Linear-evaluation training crops.
  })


def data_config() -> ml_collections.ConfigDict:
  """Every field the input pipelines read, set for the embedded digits."""
  return ml_collections.ConfigDict({
      "dataset": "digits",
      "data_dir": ml_collections.FieldReference(None, field_type=str),
      # ImageNet tars, only used with download=True.
      "manual_dir": ml_collections.FieldReference(None, field_type=str),
      "download": False,
      # None: the dataset's default split for each role.
      "train_split": ml_collections.FieldReference(None, field_type=str),
      "eval_train_split": ml_collections.FieldReference(None, field_type=str),
      "eval_test_split": ml_collections.FieldReference(None, field_type=str),
      "image_size": 32,
      # Per-channel mean and std of the [0, 1] pixels the model normalises
      # with; () = the dataset's own (ImageNet's for image folders and
      # tfds:NAME).
      "mean": (),
      "std": (),
      "batch_size": 256,  # Global, over all processes.
      "eval_batch_size": 256,
      "seed": 0,
      "shuffle_buffer": 10_000,
      "augment": augment_config(),
  })


def linear_eval_config() -> ml_collections.ConfigDict:
  """The linear evaluation protocol, plus ``standardize`` (off)."""
  return ml_collections.ConfigDict(dict(LINEAR_PROTOCOL, standardize=False))


# The projection head of each method's own recipe (configs/simo.py,
# configs/mocov2.py).
METHOD_HEADS = {"simo": "mlp_bn", "mocov2": "mlp"}


def default_config() -> ml_collections.ConfigDict:
  """SiMo with EqCo on ImageNet, ResNet-50, batch 256 (docs/method.md,
  section 2), in float32 with the colour stage on the host.

  The augmentation is MoCo v2's order (grayscale before blur); the SiMo
  recipes in ``configs/simo.py`` switch to SiMo's (blur first).
  """
  c = data_config()  # the data fields, set below
  # Method.
  c.method = "simo"  # simo | mocov2
  c.temperature = 0.2
  c.eqco = True  # False: plain InfoNCE (alpha = K), whatever alpha says.
  c.alpha = 65536.0  # EqCo's fixed "equivalent" number of negatives.
  # K: SiMo uses K of the B-1 in-batch keys, MoCo v2 K of its queue's
  # entries (one random subset per step, shared by all queries); None = all.
  c.num_negatives = ml_collections.FieldReference(None, field_type=int)
  c.symmetric = False  # SiMo: both views as queries, the two losses averaged.
  c.ema_momentum = 0.999  # EMA of the key encoder.
  c.queue_size = 65536  # MoCo v2: the queue's length (K unless num_negatives).
  c.shuffle_bn = True  # MoCo v2: Shuffle BN on the key encoder.
  # Model.
  c.model = "resnet50"
  c.width = 64
  c.small_image_stem = False
  c.zero_init_residual = True
  c.head = "mlp_bn"  # mlp_bn (SiMo's) | mlp (MoCo v2's): models.HEADS
  c.head_hidden_dim = 2048
  c.head_out_dim = 128
  # None: BN over the global batch (SyncBN).
  c.bn_group_size = ml_collections.FieldReference(None, field_type=int)
  c.dtype = "float32"  # compute dtype; params and statistics stay float32.
  c.remat = False  # recompute block activations in backward (saves memory)
  # A torchvision ResNet .pth/.safetensors the online and momentum backbones
  # start from ('' = random initialisation); see eqco_jax/program/pretrained.py.
  c.init_from = ""
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
  # Data (see data_config for every field).
  c.dataset = "imagenet2012"
  c.image_size = 224
  c.eval_batch_size = 256
  c.shuffle_buffer = 16384
  # Loop.
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.eval_every_steps = -1  # kNN monitor; -1 = never.
  c.profile_steps = 0  # > 0: trace that many steps after the compilation.
  # JAX's persistent compilation cache (local or gs://); None:
  # $JAX_COMPILATION_CACHE_DIR or ~/.cache/eqco_jax/jax_cache; '': off.
  c.compilation_cache_dir = ml_collections.FieldReference(None,
                                                          field_type=str)
  c.knn_k = 20
  c.knn_temperature = 0.07
  # After pretraining: kNN and linear evaluation of the learned backbone and
  # of the same backbone at random initialisation (small datasets; features
  # are extracted once). ImageNet uses configs/linear_eval.py instead.
  c.final_eval = False
  c.final_eval_baseline = True  # also evaluate the random-init backbone
  c.linear_eval = linear_eval_config()
  return c


def accelerator_recipe(c: ml_collections.ConfigDict
                       ) -> ml_collections.ConfigDict:
  """bfloat16 compute (params, BN statistics and the loss stay float32) and
  the colour stage (jitter, grayscale, blur) on the accelerator: every
  shipped ImageNet recipe. A host core makes only about 150-190 two-view
  images/s with the colour stage (README, Benchmarks), too few for a fast
  accelerator; the host then only decodes, crops and flips."""
  c.dtype = "bfloat16"
  c.augment.on_device = True
  return c


def small_image_recipe(c: ml_collections.ConfigDict, *, dataset: str,
                       model: str) -> ml_collections.ConfigDict:
  """Turns an ImageNet recipe into the usual 32x32 one (CIFAR-style).

  Small-image stem, batch 512, lr 0.06 per 256, weight decay 5e-4, EMA 0.99,
  no blur, 200 epochs, kNN monitor every 5 epochs, final kNN and linear
  evaluation.
  """
  c.update(dict(
      dataset=dataset, model=model, small_image_stem=True, image_size=32,
      head_hidden_dim=512, batch_size=512, eval_batch_size=512,
      base_learning_rate=0.06, weight_decay=5e-4, ema_momentum=0.99,
      num_epochs=200, final_eval=True,
      eval_every_steps=5 * 97))  # about 5 epochs of CIFAR at batch 512
  c.augment.update(dict(crop_scale=(0.2, 1.0), blur_prob=0.0))
  return c


def large_batch_recipe(c: ml_collections.ConfigDict
                       ) -> ml_collections.ConfigDict:
  """Batch 4096 with LARS for pods: lr 0.3 per 256 (as BYOL and SimCLR with
  LARS), weight decay 1e-6, 10 warm-up epochs of ImageNet, EMA 0.996."""
  c.update(dict(batch_size=4096, optimizer="lars", base_learning_rate=0.3,
                weight_decay=1e-6, warmup_steps=10 * (1281167 // 4096),
                ema_momentum=0.996))
  return c


def runlocal_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A few steps of a tiny ResNet-10 on the embedded digits, in float32, for
  a laptop."""
  small_image_recipe(c, dataset="digits", model="resnet10")
  c.update(dict(width=8, head_hidden_dim=128, batch_size=32,
                num_train_steps=20, log_every_steps=5,
                checkpoint_every_steps=10, dtype="float32"))
  return c


# A variant of a recipe: the fields it sets, or a function that changes the
# config in place.
Variant = Mapping[str, Any] | Callable[[ml_collections.ConfigDict], Any]


def apply_variant(c: ml_collections.ConfigDict, name: str,
                  variants: Mapping[str, Variant], recipe: str
                  ) -> ml_collections.ConfigDict:
  """``c`` changed as ``variants[name]`` says (the ``:VARIANT`` of
  ``--config=FILE:VARIANT``); ``recipe`` names the file in the message."""
  if name not in variants:
    raise UserError(f"unknown {recipe} variant {name!r}; use one of "
                    f"{', '.join(variants)}.")
  change = variants[name]
  if callable(change):
    change(c)
  else:
    c.update(dict(change))
  return c


def nearest_name(name: str, names: Iterable[str]) -> str | None:
  """The one of ``names`` closest to the mistyped ``name`` (as a whole, or
  one of its ``_``-separated words); None when none is close."""

  def likeness(candidate: str) -> tuple[float, float]:
    whole = difflib.SequenceMatcher(None, name, candidate).ratio()
    words = max(difflib.SequenceMatcher(None, name, word).ratio()
                for word in candidate.split("_"))
    return max(whole, words), whole

  nearest = max(names, key=likeness, default=None)
  if nearest is None or likeness(nearest)[0] < 0.75:
    return None
  return nearest


def check_field(config: ml_collections.ConfigDict, path: str) -> None:
  """Raises UserError when ``config`` has no field at the dotted ``path``
  (as ``--config.PATH=VALUE`` names it), naming the nearest field."""
  node, parts = config, path.split(".")
  for depth, part in enumerate(parts):
    prefix = ".".join(parts[:depth] + [""])
    if not isinstance(node, ml_collections.ConfigDict):
      raise UserError(f"config has no field {path}; {prefix[:-1]} is a "
                      "value, not a group of fields.")
    name = part.split("[")[0]  # FIELD[INDEX]: the override's parser judges
    if name not in node:
      nearest = nearest_name(name, node.keys())
      advice = (f"did you mean {prefix}{nearest}?" if nearest else
                "check its name in the config file.")
      raise UserError(f"config has no field {prefix}{name}; {advice}")
    if name != part:
      return
    node = node[name]


# Config fields and values renamed since older runs recorded their
# config.json and the identity of their checkpoints: old -> new.
RENAMED_FIELDS = {"momentum": "ema_momentum", "linear_probe": "linear_eval"}
RENAMED_VALUES = {"head": {"simo": "mlp_bn", "mocov2": "mlp"}}


def upgrade_names(record: dict[str, Any]) -> dict[str, Any]:
  """``record`` under today's field names and values.

  ``record`` is a config as JSON (nested dicts) or a checkpoint's identity
  (flat, dotted names such as ``linear_probe.epochs``); the renamed fields
  are top-level ones (or sub-configs). A field recorded under both names
  keeps today's.
  """
  upgraded = {}
  for name, value in record.items():
    first, dot, rest = name.partition(".")
    new_name = RENAMED_FIELDS.get(first, first) + dot + rest
    if new_name in record and new_name != name:
      continue
    if isinstance(value, str):
      value = RENAMED_VALUES.get(new_name, {}).get(value, value)
    upgraded[new_name] = value
  return upgraded


def loss_alpha(config: ml_collections.ConfigDict) -> float | None:
  """The ``alpha`` the loss gets: None (plain InfoNCE) unless EqCo is on."""
  return config.alpha if config.get("eqco", True) else None


def negatives_per_query(config: ml_collections.ConfigDict) -> int:
  """K, the negatives each query really sees."""
  if config.num_negatives:
    return int(config.num_negatives)
  return (config.queue_size if config.method == "mocov2"
          else config.batch_size - 1)


# Below this many examples per device a step's matmuls and convolutions are
# too small to keep an accelerator busy.
MIN_PER_DEVICE_BATCH = 8


def per_device_batch_advice(config: ml_collections.ConfigDict,
                            num_devices: int) -> str | None:
  """One sentence when the config's per-device batch is below
  ``MIN_PER_DEVICE_BATCH``, naming the recipe to use instead; else None."""
  per_device = config.batch_size // num_devices
  if per_device >= MIN_PER_DEVICE_BATCH:
    return None
  return (f"the per-device batch is {per_device} (batch_size="
          f"{config.batch_size} over {num_devices} devices), too small to "
          f"keep an accelerator busy: use configs/{config.method}.py:"
          f"imagenet_r50_large (batch 4096, LARS) or a batch_size of at least "
          f"{MIN_PER_DEVICE_BATCH * num_devices} with the learning-rate rule "
          f"of the README's recipes per hardware.")


def _fail(field: str, value: Any, allowed: str) -> None:
  raise UserError(f"config.{field}={value!r} is not allowed: {allowed}.")


def _is_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_probability(field: str, value: Any) -> None:
  if not _is_number(value) or not 0.0 <= value <= 1.0:
    _fail(field, value, "use a probability in [0, 1]")


def _check_interval(field: str, value: Any, low: float, high: float,
                    example: str) -> None:
  """``value`` must be a pair (a, b) with low <= a <= b <= high."""
  if (not isinstance(value, (tuple, list)) or len(value) != 2
      or not all(_is_number(v) for v in value)
      or not low <= value[0] <= value[1] <= high):
    _fail(field, value, f"use a pair (a, b) with {low} <= a <= b <= {high}, "
          f"such as {example}")


def _validate_augment(a: ml_collections.ConfigDict) -> None:
  for field in ("flip_prob", "color_jitter_prob", "grayscale_prob",
                "blur_prob"):
    _check_probability(f"augment.{field}", a[field])
  for field in ("brightness", "contrast", "saturation"):
    if not _is_number(a[field]) or a[field] < 0:
      _fail(f"augment.{field}", a[field], "use a strength >= 0 such as 0.4")
  if not _is_number(a.hue) or not 0.0 <= a.hue <= 0.5:
    _fail("augment.hue", a.hue, "use a value in [0, 0.5] such as 0.1")
  _check_interval("augment.crop_scale", a.crop_scale, 1e-6, 1.0, "(0.2, 1.0)")
  _check_interval("augment.eval_crop_scale", a.eval_crop_scale, 1e-6, 1.0,
                  "(0.08, 1.0)")
  _check_interval("augment.crop_ratio", a.crop_ratio, 1e-6, 1e6,
                  "(0.75, 1.333)")
  _check_interval("augment.blur_sigma", a.blur_sigma, 1e-6, 1e6, "(0.1, 2.0)")
  if not _is_number(a.blur_kernel_fraction) or not (
      0.0 < a.blur_kernel_fraction < 1.0):
    _fail("augment.blur_kernel_fraction", a.blur_kernel_fraction,
          "use a fraction of the image side in (0, 1) such as 0.1")
  for field in ("blur_before_grayscale", "on_device"):
    if not isinstance(a[field], bool):
      _fail(f"augment.{field}", a[field], "use True or False")


def validate_linear_eval(p: ml_collections.ConfigDict, prefix: str) -> None:
  """Checks the protocol fields of ``p``; messages name ``prefix + field``."""
  for field in ("epochs", "batch_size"):
    if not _is_int(p[field]) or p[field] < 1:
      _fail(prefix + field, p[field], "use a positive integer")
  if not _is_number(p.learning_rate) or p.learning_rate <= 0:
    _fail(prefix + "learning_rate", p.learning_rate,
          "use a value > 0 (the protocol: 30)")
  if not _is_number(p.momentum) or not 0.0 <= p.momentum < 1.0:
    _fail(prefix + "momentum", p.momentum, "use a value in [0, 1) such as 0.9")
  if not _is_number(p.weight_decay) or p.weight_decay < 0:
    _fail(prefix + "weight_decay", p.weight_decay, "use a value >= 0")
  decay = tuple(p.decay_epochs)
  if not all(_is_int(e) and 0 < e for e in decay) or list(decay) != sorted(
      decay):
    _fail(prefix + "decay_epochs", decay,
          "use increasing positive epochs such as (60, 80)")
  if not isinstance(p.standardize, bool):
    _fail(prefix + "standardize", p.standardize, "use True or False")


def validate(config: ml_collections.ConfigDict,
             num_devices: int | None = None) -> None:
  """Raises UserError naming the field, the value and what is allowed.

  Runs before anything is compiled or any data is read: ``main`` runs it
  before the heavy imports, without ``num_devices``; the training loop with
  the device count, which the batch sizes must be divisible by. The choices
  (method, model, head, dtype, optimizer) are checked last: only they import
  JAX, so that a bad number is refused at once. ``dataset`` and the split
  names are checked by the data layer when it opens the source.
  """
  _validate_batches(config, num_devices)
  _validate_method(config)
  _validate_optimisation(config)
  _validate_model(config)
  _validate_loop(config)
  _validate_augment(config.augment)
  _validate_normalisation(config)
  validate_linear_eval(config.linear_eval, "linear_eval.")
  validate_init_from(config.get("init_from", ""))
  _validate_choices(config)


def _validate_batches(c: ml_collections.ConfigDict,
                      num_devices: int | None) -> None:
  if not _is_int(c.batch_size) or c.batch_size < 2:
    _fail("batch_size", c.batch_size, "use an integer >= 2")
  for field in ("batch_size", "eval_batch_size"):
    if not _is_int(c[field]) or c[field] < 1:
      _fail(field, c[field], "use a positive integer")
    if num_devices is not None and c[field] % num_devices:
      _fail(field, c[field],
            f"it must be divisible by the {num_devices} devices")


def _validate_normalisation(c: ml_collections.ConfigDict) -> None:
  for field, low in (("mean", -math.inf), ("std", 0.0)):
    value = c.get(field, ())
    if value == () or value is None:
      continue
    if (not isinstance(value, (tuple, list)) or len(value) != 3
        or not all(_is_number(v) and v > low for v in value)):
      _fail(field, value, "use three numbers, one per RGB channel, on the "
            "[0, 1] pixel scale" + (", all > 0" if field == "std" else "")
            + ", or () for the dataset's own")


def _validate_method(c: ml_collections.ConfigDict) -> None:
  """The loss and the negatives (those of the method ``c.method`` names)."""
  if not _is_number(c.temperature) or c.temperature <= 0:
    _fail("temperature", c.temperature, "use a value > 0 (the paper: 0.2)")
  if c.alpha is not None and (not _is_number(c.alpha) or c.alpha <= 0):
    _fail("alpha", c.alpha,
          "use a value > 0 (or eqco=False for plain InfoNCE)")
  if not _is_number(c.ema_momentum) or not 0.0 <= c.ema_momentum < 1.0:
    _fail("ema_momentum", c.ema_momentum,
          "use a value in [0, 1) such as 0.999")
  if c.method == "simo":
    if c.num_negatives is not None and not (
        1 <= c.num_negatives <= c.batch_size - 1):
      _fail("num_negatives", c.num_negatives,
            f"use 1..{c.batch_size - 1} (batch_size - 1) or None for all")
  elif c.method == "mocov2":  # an unknown method is refused by its name
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


def _validate_optimisation(c: ml_collections.ConfigDict) -> None:
  if not _is_number(c.base_learning_rate) or c.base_learning_rate <= 0:
    _fail("base_learning_rate", c.base_learning_rate, "use a value > 0")
  if not _is_int(c.warmup_steps) or c.warmup_steps < 0:
    _fail("warmup_steps", c.warmup_steps, "use an integer >= 0")
  if not _is_number(c.weight_decay) or c.weight_decay < 0:
    _fail("weight_decay", c.weight_decay, "use a value >= 0 such as 1e-4")
  if not _is_number(c.sgd_momentum) or not 0.0 <= c.sgd_momentum < 1.0:
    _fail("sgd_momentum", c.sgd_momentum, "use a value in [0, 1) such as 0.9")
  if c.num_train_steps <= 0 and c.num_epochs <= 0:
    _fail("num_epochs", c.num_epochs,
          "use a value > 0 or set num_train_steps > 0")


def _validate_model(c: ml_collections.ConfigDict) -> None:
  for field in ("width", "head_hidden_dim", "head_out_dim"):
    if not _is_int(c[field]) or c[field] < 1:
      _fail(field, c[field], "use a positive integer")
  if c.bn_group_size is not None:
    if c.bn_group_size < 2 or c.batch_size % c.bn_group_size:
      _fail("bn_group_size", c.bn_group_size,
            f"use a divisor >= 2 of batch_size={c.batch_size}, or None")
  if c.image_size < 8:
    _fail("image_size", c.image_size, "use at least 8 pixels")


def _validate_loop(c: ml_collections.ConfigDict) -> None:
  """Logging, checkpoints, profiling and the kNN monitor."""
  if c.eval_every_steps != -1 and c.eval_every_steps <= 0:
    _fail("eval_every_steps", c.eval_every_steps, "use -1 (never) or > 0")
  if not _is_int(c.profile_steps) or c.profile_steps < 0:
    _fail("profile_steps", c.profile_steps, "use 0 (none) or a step count")
  for field in ("log_every_steps", "checkpoint_every_steps",
                "keep_checkpoints", "shuffle_buffer", "knn_k"):
    if not _is_int(c[field]) or c[field] <= 0:
      _fail(field, c[field], "use a positive integer")
  if not _is_number(c.knn_temperature) or c.knn_temperature <= 0:
    _fail("knn_temperature", c.knn_temperature, "use a value > 0 such as 0.07")


def _validate_choices(c: ml_collections.ConfigDict) -> None:
  """The fields that name a method, model, head, dtype or optimizer."""
  # Imported here: they bring in JAX, which building a config does not need.
  # pylint: disable=g-import-not-at-top
  from eqco_jax.core import models, optim
  from eqco_jax.core.methods import METHODS

  for field, choices in (("method", METHODS), ("model", models.LAYOUTS),
                         ("head", models.HEADS), ("dtype", models.DTYPES),
                         ("optimizer", optim.OPTIMIZERS)):
    if c[field] not in choices:
      _fail(field, c[field], f"use one of {tuple(choices)}")


def validate_init_from(path: Any) -> None:
  """``config.init_from`` must be '', an existing local file or a URL
  (``gs://``, ``https://``: the program checks those when it reads them)."""
  if not isinstance(path, str) or (
      path and "://" not in path
      and not os.path.isfile(os.path.expanduser(path))):
    _fail("init_from", path, "use '', or the path, gs:// or https:// URL of "
          "a ResNet .pth or .safetensors")
