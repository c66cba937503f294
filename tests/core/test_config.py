"""eqco_jax.core.config: the shipped recipes are valid and follow
docs/method.md, every refused value gets its own one-sentence message, the
choices are the registries' names, and the schema stays below JAX."""

import pytest

import ast

from helpers import config_module, run_python
from eqco_jax.core import config as config_lib
from eqco_jax.core import models
from eqco_jax.core.errors import UserError
from eqco_jax.core.methods import METHODS
from eqco_jax.core.training import optim

RECIPES = ("simo", "mocov2", "cifar10", "quickstart")


def load_config(name: str, variant: str | None = None):
  module = config_module(f"{name}.py")
  return module.get_config() if variant is None else module.get_config(
      variant)


@pytest.mark.parametrize("name, variant", [
    (name, variant) for name in RECIPES
    for variant in config_module(f"{name}.py").VARIANTS])
def test_every_shipped_recipe_is_valid(name, variant):
  config = load_config(name, variant)
  config_lib.validate(config, num_devices=8)


def test_recipes_follow_docs_method():
  simo = load_config("simo", "imagenet_r50")
  assert (simo.batch_size, simo.base_learning_rate, simo.temperature,
          simo.ema_momentum, simo.alpha, simo.num_negatives, simo.num_epochs,
          simo.weight_decay, simo.bn_group_size, simo.zero_init_residual) == (
              256, 0.03, 0.2, 0.999, 65536.0, None, 200, 1e-4, None, True)
  assert simo.augment.blur_before_grayscale
  moco = load_config("mocov2", "imagenet_r50")
  assert (moco.queue_size, moco.eqco, moco.head, moco.bn_group_size,
          moco.shuffle_bn, moco.zero_init_residual) == (
              65536, False, "mlp", 32, True, False)
  assert not moco.augment.blur_before_grayscale
  k16 = load_config("mocov2", "imagenet_r50_k16")
  assert (k16.eqco, k16.alpha, k16.num_negatives) == (True, 65536.0, 16)
  official = load_config("simo", "imagenet_r50_official")
  assert not official.eqco and official.num_negatives is None
  large = load_config("simo", "imagenet_r50_large")
  assert (large.batch_size, large.optimizer, large.warmup_epochs) == (
      4096, "lars", 10.0)


def test_unknown_variant_is_refused():
  with pytest.raises(UserError, match="unknown SiMo variant 'nope'; use one "
                     "of imagenet_r50, imagenet_r50_800ep, "):
    load_config("simo", "nope")


def test_without_a_device_count_the_batch_sizes_need_not_divide():
  config = config_lib.default_config()
  config.batch_size = 100
  config_lib.validate(config)
  with pytest.raises(UserError, match="divisible by the 8 devices"):
    config_lib.validate(config, num_devices=8)


def test_a_config_is_built_and_refused_without_importing_jax():
  """The schema names the choices itself, so a bad value of any field
  answers at once, where JAX is not even imported."""
  run_python("import sys",
             "from eqco_jax.core import config as config_lib",
             "from eqco_jax.core.errors import UserError",
             "def refusal(config):",
             "  try:",
             "    config_lib.validate(config)",
             "  except UserError as error:",
             "    return str(error)",
             "  raise AssertionError('accepted')",
             "config = config_lib.default_config()",
             "config.batch_size = -8",
             "assert 'config.batch_size=-8' in refusal(config)",
             "config.batch_size, config.method = 256, 'byol'",
             "assert 'config.method=' in refusal(config)",
             "assert 'jax' not in sys.modules")


@pytest.mark.parametrize("field, registry", [
    ("method", METHODS), ("model", models.LAYOUTS), ("head", models.HEADS),
    ("dtype", models.DTYPES), ("optimizer", optim.OPTIMIZERS)])
def test_the_choices_are_the_registries_names(field, registry):
  rule = next(r for name, _, r in config_lib.FIELDS if name == field)
  allowed = ast.literal_eval(rule[1].removeprefix("use one of "))
  assert set(allowed) == set(registry)
  assert all(rule[0](name) for name in registry) and not rule[0]("other")


def test_the_schema_is_small_and_imports_nothing_above_it():
  import pathlib  # pylint: disable=g-import-not-at-top
  source = pathlib.Path(config_lib.__file__).read_text()
  assert len(source.splitlines()) < 250
  imported = {node.module for node in ast.walk(ast.parse(source))
              if isinstance(node, ast.ImportFrom)}
  assert imported <= {"__future__", "typing", "eqco_jax.core.errors"}


REFUSED = [
    # (field overrides, devices, message fragment)
    ({"method": "byol"}, 1, r"config.method='byol' is not allowed: use one of"),
    ({"model": "vit"}, 1, r"config.model='vit'"),
    ({"head": "simo"}, 1, r"config.head='simo' is not allowed: use one of "
     r"\('mlp_bn', 'mlp'\)"),
    ({"dtype": "float16"}, 1, r"config.dtype='float16'"),
    ({"optimizer": "adam"}, 1, r"config.optimizer='adam'"),
    ({"batch_size": 1}, 1, r"config.batch_size=1 .* integer >= 2"),
    ({"batch_size": 100}, 8, r"config.batch_size=100 .* divisible by the 8 "
                             r"devices"),
    ({"temperature": 0.0}, 1, r"config.temperature=0.0"),
    ({"temperature": -0.1}, 1, r"config.temperature=-0.1"),
    ({"alpha": 0.0}, 1, r"config.alpha=0.0"),
    ({"ema_momentum": 1.0}, 1, r"config.ema_momentum=1.0"),
    ({"warmup_steps": -1}, 1, r"config.warmup_steps=-1"),
    ({"weight_decay": -1e-4}, 1, r"config.weight_decay=-0.0001"),
    ({"sgd_momentum": 1.5}, 1, r"config.sgd_momentum=1.5"),
    ({"keep_checkpoints": 0}, 1, r"config.keep_checkpoints=0"),
    ({"knn_temperature": 0.0}, 1, r"config.knn_temperature=0.0"),
    ({"head_out_dim": 0}, 1, r"config.head_out_dim=0"),
    ({"augment.flip_prob": 1.5}, 1, r"config.augment.flip_prob=1.5 .* "
                                    r"probability"),
    ({"augment.brightness": -0.1}, 1, r"config.augment.brightness=-0.1"),
    ({"augment.hue": 0.6}, 1, r"config.augment.hue=0.6"),
    ({"augment.crop_scale": (0.9, 0.2)}, 1,
     r"config.augment.crop_scale=\(0.9, 0.2\) .* a <= b"),
    ({"augment.blur_sigma": (0.0, 2.0)}, 1, r"config.augment.blur_sigma"),
    ({"augment.blur_kernel_fraction": 1.0}, 1,
     r"config.augment.blur_kernel_fraction=1.0"),
    ({"linear_eval.epochs": 0}, 1, r"config.linear_eval.epochs=0"),
    ({"linear_eval.learning_rate": -1.0}, 1,
     r"config.linear_eval.learning_rate=-1.0"),
    ({"linear_eval.momentum": 1.0}, 1, r"config.linear_eval.momentum=1.0"),
    ({"linear_eval.decay_epochs": (80, 60)}, 1,
     r"config.linear_eval.decay_epochs=\(80, 60\) .* increasing"),
    ({"base_learning_rate": 0.0}, 1, r"config.base_learning_rate=0.0"),
    ({"num_epochs": 0, "num_train_steps": -1}, 1, r"config.num_epochs=0"),
    ({"width": 0}, 1, r"config.width=0"),
    ({"num_negatives": 256}, 1, r"config.num_negatives=256 .* 1..255"),
    ({"num_negatives": 0}, 1, r"config.num_negatives=0"),
    ({"method": "mocov2", "symmetric": True}, 1, r"config.symmetric=True"),
    ({"method": "mocov2", "queue_size": 1000}, 1,
     r"config.queue_size=1000 .* multiple of batch_size=256"),
    ({"method": "mocov2", "queue_size": 128}, 1, r"config.queue_size=128"),
    ({"method": "mocov2", "num_negatives": 70000}, 1,
     r"config.num_negatives=70000 .* 1..65536"),
    ({"bn_group_size": 48}, 1, r"config.bn_group_size=48 .* divisor"),
    ({"eval_every_steps": 0}, 1, r"config.eval_every_steps=0"),
    ({"log_every_steps": 0}, 1, r"config.log_every_steps=0"),
    ({"checkpoint_every_steps": -5}, 1, r"config.checkpoint_every_steps=-5"),
    ({"image_size": 4}, 1, r"config.image_size=4"),
    ({"image_size": 10**6}, 1, r"config.image_size=1000000 .* \[8, 4096\]"),
    ({"seed": -1}, 1, r"config.seed=-1 .* \[0, 2147483647\]"),
    ({"warmup_epochs": -1.0}, 1, r"config.warmup_epochs=-1.0"),
    ({"eval_every_epochs": -5}, 1, r"config.eval_every_epochs=-5"),
    ({"mean": (0.5, 0.5)}, 1, r"config.mean=\(0.5, 0.5\) .* three numbers"),
    ({"std": (0.5, 0.0, 0.5)}, 1, r"config.std=\(0.5, 0.0, 0.5\) .* all > 0"),
]


@pytest.mark.parametrize("overrides, devices, message", REFUSED)
def test_refused_values_name_field_value_and_remedy(overrides, devices, message):
  config = config_lib.default_config()
  for field, value in overrides.items():
    node, *path = field.split(".")
    if path:
      config[node][path[0]] = value
    else:
      config[field] = value
  with pytest.raises(ValueError, match=message) as error:
    config_lib.validate(config, num_devices=devices)
  text = str(error.value)
  assert text.count(". ") == 0 and text.endswith("."), text  # one sentence


def test_defaults_are_valid():
  config_lib.validate(config_lib.default_config(), num_devices=8)
