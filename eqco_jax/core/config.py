"""The pretraining config's schema: every field, its default and the rule
for its values, checked before anything compiles. The defaults are SiMo with
EqCo on ImageNet, ResNet-50, batch 256 (docs/method.md, section 2); the
recipes are in ``configs/``; epochs become steps where the run is built
(``core.training.builders.derived``). No JAX, no TensorFlow."""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping

import ml_collections

from eqco_jax.core.errors import UserError

# A rule: (accepts(value), what is allowed, for the refusal).
Rule = tuple[Callable[[Any], bool], str]
MAX_SEED = 2**31 - 1  # what JAX's keys and numpy's seed sequences take


def _number(v: Any, integer: bool = False) -> bool:
  kinds = int if integer else (int, float)
  return (isinstance(v, kinds) and not isinstance(v, bool)
          and math.isfinite(v))


def _range(low: float, high: float = math.inf, *, integer: bool = False,
           closed: str = "[", example: Any = None) -> Rule:
  what = "an integer" if integer else "a value"
  allowed = (f"use {what} {'>=' if closed == '[' else '>'} {low:g}"
             if high == math.inf else f"use an integer in [{low}, {high - 1}]"
             if integer else f"use {what} in {closed}{low:g}, {high:g})")
  return (lambda v: _number(v, integer) and (
      low <= v if closed == "[" else low < v) and v < high,
          allowed + ("" if example is None else f" such as {example}"))


def _pair(low: float, high: float, example: str) -> Rule:
  return (lambda v: isinstance(v, (tuple, list)) and len(v) == 2
          and all(map(_number, v)) and low <= v[0] <= v[1] <= high,
          f"use a pair (a, b) with {low} <= a <= b <= {high}, such as "
          f"{example}")


def _channels(low: float) -> Rule:
  return (lambda v: v in ((), None) or (
      isinstance(v, (tuple, list)) and len(v) == 3
      and all(_number(x) and x > low for x in v)),
          "use three numbers, one per RGB channel, on the [0, 1] pixel "
          f"scale{', all > 0' if low == 0 else ''}, or () for the dataset's "
          "own")


def _one_of(*choices: str) -> Rule:
  return (lambda v: v in choices, f"use one of {choices}")


ANY: Rule = (lambda v: True, "")
BOOL: Rule = (lambda v: isinstance(v, bool), "use True or False")
COUNT: Rule = (lambda v: _number(v, True) and v >= 1, "use a positive integer")
PROBABILITY: Rule = (lambda v: _number(v) and 0 <= v <= 1,
                     "use a probability in [0, 1]")
UNSET_INT = ml_collections.FieldReference(None, field_type=int)
UNSET_STR = ml_collections.FieldReference(None, field_type=str)
# (field, default, rule), sub-configs' fields dotted; None (``UNSET_*``) is
# checked with the fields it depends on.
FIELDS: tuple[tuple[str, Any, Rule], ...] = (
    # Method.
    ("method", "simo", _one_of("simo", "mocov2")),
    ("temperature", 0.2, _range(0, closed="(", example=0.2)),
    ("eqco", True, BOOL),  # False: plain InfoNCE (alpha = K)
    ("alpha", 65536.0, (lambda v: v is None or (_number(v) and v > 0),
                        "use a value > 0 (or eqco=False for plain InfoNCE)")),
    # K: SiMo uses K of the B-1 in-batch keys, MoCo v2 K of its queue's
    # entries (one random subset per step, shared by all queries); None: all.
    ("num_negatives", UNSET_INT, ANY),
    ("symmetric", False, BOOL),  # SiMo: both views as queries
    ("ema_momentum", 0.999, _range(0, 1, example=0.999)),  # the key encoder's
    ("queue_size", 65536, COUNT), ("shuffle_bn", True, BOOL),  # MoCo v2's
    # Model (the names are models.LAYOUTS', HEADS' and DTYPES').
    ("model", "resnet50", _one_of("resnet10", "resnet18", "resnet34",
                                  "resnet50", "resnet101")),
    ("width", 64, COUNT),
    ("small_image_stem", False, BOOL), ("zero_init_residual", True, BOOL),
    ("head", "mlp_bn", _one_of("mlp_bn", "mlp")),  # with BN (SiMo) or not
    ("head_hidden_dim", 2048, COUNT), ("head_out_dim", 128, COUNT),
    ("bn_group_size", UNSET_INT, ANY),  # None: BN over the global batch
    ("dtype", "float32", _one_of("float32", "bfloat16")),  # of the compute
    ("remat", False, BOOL),  # recompute block activations in backward
    ("init_from", "", (  # a ResNet file both backbones start from
        lambda v: isinstance(v, str) and (not v or "://" in v or os.path.isfile(
            os.path.expanduser(v))), "use '', or the path, gs:// or https:// "
        "URL of a ResNet .pth or .safetensors")),
    # Data.
    ("dataset", "imagenet2012", ANY),  # a catalog name, image_folder, tfds:N
    ("data_dir", UNSET_STR, ANY),
    ("manual_dir", UNSET_STR, ANY), ("download", False, BOOL),  # ImageNet's
    ("train_split", UNSET_STR, ANY),  # None: the dataset's split per role
    ("eval_train_split", UNSET_STR, ANY), ("eval_test_split", UNSET_STR, ANY),
    ("image_size", 224, _range(8, 4097, integer=True, example=224)),
    ("mean", (), _channels(-math.inf)),  # (): the dataset's own
    ("std", (), _channels(0.0)),
    ("batch_size", 256, _range(2, integer=True)),  # every device's, together
    ("eval_batch_size", 256, COUNT),
    ("seed", 0, _range(0, MAX_SEED + 1, integer=True)),
    ("shuffle_buffer", 16384, COUNT),
    ("augment.crop_scale", (0.2, 1.0), _pair(1e-6, 1.0, "(0.2, 1.0)")),
    ("augment.crop_ratio", (3 / 4, 4 / 3), _pair(1e-6, 1e6, "(0.75, 1.333)")),
    ("augment.flip_prob", 0.5, PROBABILITY),
    ("augment.color_jitter_prob", 0.8, PROBABILITY),
    ("augment.brightness", 0.4, _range(0, example=0.4)),
    ("augment.contrast", 0.4, _range(0, example=0.4)),
    ("augment.saturation", 0.4, _range(0, example=0.4)),
    ("augment.hue", 0.1, (lambda v: _number(v) and 0 <= v <= 0.5,
                          "use a value in [0, 0.5] such as 0.1")),
    ("augment.grayscale_prob", 0.2, PROBABILITY),
    ("augment.blur_prob", 0.5, PROBABILITY),
    ("augment.blur_sigma", (0.1, 2.0), _pair(1e-6, 1e6, "(0.1, 2.0)")),
    ("augment.blur_kernel_fraction", 0.1, _range(0, 1, closed="(")),
    ("augment.blur_before_grayscale", False, BOOL),  # True: SiMo's order
    ("augment.on_device", False, BOOL),  # the colour stage in the step
    ("augment.eval_crop_scale", (0.08, 1.0), _pair(1e-6, 1.0, "(0.08, 1.0)")),
    # Optimisation.
    ("optimizer", "sgd", _one_of("sgd", "lars")),  # optim.OPTIMIZERS
    ("base_learning_rate", 0.03, _range(0, closed="(")),  # per 256 images
    ("warmup_steps", 10, _range(0, integer=True)),
    ("warmup_epochs", 0.0, _range(0)),  # > 0 overrides warmup_steps
    ("weight_decay", 1e-4, _range(0, example=1e-4)),
    ("sgd_momentum", 0.9, _range(0, 1, example=0.9)),
    ("num_epochs", 200, ANY), ("num_train_steps", -1, ANY),  # > 0 wins
    # Loop.
    ("log_every_steps", 50, COUNT),
    ("checkpoint_every_steps", 1000, COUNT),
    ("keep_checkpoints", 3, COUNT),
    ("eval_every_steps", -1, (lambda v: _number(v, True) and (v == -1 or v > 0),
                              "use -1 (never) or > 0")),  # the kNN monitor
    ("eval_every_epochs", 0.0, _range(0)),  # > 0 overrides eval_every_steps
    ("profile_steps", 0, _range(0, integer=True)),  # traced after compiling
    ("compilation_cache_dir", UNSET_STR, ANY),  # None: the default; '': off
    ("knn_k", 20, COUNT), ("knn_temperature", 0.07, _range(0, closed="(")),
    # After pretraining (small datasets): kNN and linear evaluation of the
    # learned backbone, and of its random initialisation (the baseline).
    ("final_eval", False, BOOL), ("final_eval_baseline", True, BOOL),
)
# The linear evaluation protocol (docs/method.md, section 4): a pretraining
# config's ``linear_eval``, and a linear evaluation's own fields.
PROTOCOL: tuple[tuple[str, Any, Rule], ...] = (
    ("epochs", 90, COUNT), ("batch_size", 256, COUNT),
    ("learning_rate", 30.0, _range(0, closed="(", example=30)),
    ("momentum", 0.9, _range(0, 1, example=0.9)),
    ("weight_decay", 0.0, _range(0)),
    ("decay_epochs", (60, 80), (lambda v: list(v) == sorted(v) and all(
        _number(e, True) and e > 0 for e in v), "use increasing positive "
                                "epochs such as (60, 80)")),
    ("standardize", False, BOOL),  # z-score the features first
)


def _config(fields: tuple[tuple[str, Any, Rule], ...]
            ) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  for name, default, _ in fields:
    *groups, leaf = name.split(".")
    node = c
    for group in groups:
      node[group] = node.get(group) or ml_collections.ConfigDict()
      node = node[group]
    node[leaf] = (ml_collections.FieldReference(None, default.get_type())
                  if isinstance(default, ml_collections.FieldReference)
                  else default)
  return c


def linear_eval_config() -> ml_collections.ConfigDict:
  """The protocol's fields at their defaults."""
  return _config(PROTOCOL)


def default_config() -> ml_collections.ConfigDict:
  """Every field at its default (see the module's doc)."""
  c = _config(FIELDS)
  c.linear_eval = linear_eval_config()
  return c


def apply_variant(c: ml_collections.ConfigDict, name: str,
                  variants: Mapping[str, Any], recipe: str
                  ) -> ml_collections.ConfigDict:
  """``c`` changed as ``variants[name]`` (the fields it sets, or a function
  that changes ``c``) says: ``--config=FILE:VARIANT``, ``recipe`` the file."""
  if name not in variants:
    raise UserError(f"unknown {recipe} variant {name!r}; use one of "
                    f"{', '.join(variants)}.")
  change = variants[name]
  if callable(change):
    change(c)
  else:
    c.update(dict(change))
  return c


def _fail(field: str, value: Any, allowed: str) -> None:
  value = tuple(value) if isinstance(value, list) else value
  raise UserError(f"config.{field}={value!r} is not allowed: {allowed}.")


def _check(config: ml_collections.ConfigDict,
           fields: tuple[tuple[str, Any, Rule], ...], prefix: str = "") -> None:
  for name, _, (accepts, allowed) in fields:
    value = config
    for part in name.split("."):
      value = value[part]
    if not accepts(value):
      _fail(prefix + name, value, allowed)


def validate_linear_eval(p: ml_collections.ConfigDict, prefix: str) -> None:
  """Checks the protocol fields of ``p``; messages name ``prefix + field``."""
  _check(p, PROTOCOL, prefix)


def validate(c: ml_collections.ConfigDict,
             num_devices: int | None = None) -> None:
  """Raises UserError naming the field, the value and what is allowed; with
  ``num_devices``, the batch sizes must divide by it too."""
  _check(c, FIELDS)
  if c.num_train_steps <= 0 and c.num_epochs <= 0:
    _fail("num_epochs", c.num_epochs,
          "use a value > 0 or set num_train_steps > 0")
  for field in ("batch_size", "eval_batch_size"):
    if num_devices and c[field] % num_devices:
      _fail(field, c[field],
            f"it must be divisible by the {num_devices} devices")
  most, of = c.batch_size - 1, "batch_size - 1) or None for all"
  if c.method == "mocov2":
    if c.symmetric:
      _fail("symmetric", c.symmetric, "the symmetric loss is a SiMo switch")
    if c.queue_size < c.batch_size or c.queue_size % c.batch_size:
      _fail("queue_size", c.queue_size,
            f"it must be a positive multiple of batch_size={c.batch_size}")
    most, of = c.queue_size, "queue_size) or None for the whole queue"
  if c.num_negatives is not None and not 1 <= c.num_negatives <= most:
    _fail("num_negatives", c.num_negatives, f"use 1..{most} ({of}")
  if c.bn_group_size is not None and (
      c.bn_group_size < 2 or c.batch_size % c.bn_group_size):
    _fail("bn_group_size", c.bn_group_size,
          f"use a divisor >= 2 of batch_size={c.batch_size}, or None")
  validate_linear_eval(c.linear_eval, "linear_eval.")
