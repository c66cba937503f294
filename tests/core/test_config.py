"""eqco_jax.core.config: the shipped recipes are valid and follow
docs/method.md, every refused value gets its own one-sentence message (an
unknown field its nearest name), and runs recorded under older names read
under today's."""

import pytest

from helpers import config_module, run_python
from eqco_jax.core import config as config_lib
from eqco_jax.core.errors import UserError


def load_config(name: str, variant: str | None = None):
  module = config_module(f"{name}.py")
  return module.get_config() if variant is None else module.get_config(
      variant)


@pytest.mark.parametrize("name, variant", [
    (name, variant) for name in ("simo", "mocov2", "quickstart")
    for variant in config_module(f"{name}.py").VARIANTS])
def test_every_shipped_recipe_is_valid(name, variant):
  config = load_config(name, variant)
  config_lib.validate(config, num_devices=8)


def test_recipes_follow_the_spec():
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
  assert config_lib.loss_alpha(moco) is None
  assert not moco.augment.blur_before_grayscale
  k16 = load_config("mocov2", "imagenet_r50_k16")
  assert (k16.num_negatives, config_lib.loss_alpha(k16)) == (16, 65536.0)
  # The official SiMo code's released run (68.04): alpha = K = 256, that is
  # plain InfoNCE over the 255 in-batch negatives.
  official = load_config("simo", "imagenet_r50_official")
  assert config_lib.loss_alpha(official) is None
  assert config_lib.negatives_per_query(official) == 255
  assert config_lib.negatives_per_query(simo) == 255
  assert config_lib.negatives_per_query(k16) == 16


def test_unknown_variant_is_refused():
  with pytest.raises(UserError, match="unknown SiMo variant 'nope'; use one "
                     "of imagenet_r50, imagenet_r50_800ep, "):
    load_config("simo", "nope")


@pytest.mark.parametrize("path, message", [
    ("lerning_rate", "config has no field lerning_rate; did you mean "
     "base_learning_rate?"),
    ("temprature", "config has no field temprature; did you mean "
     "temperature?"),
    ("augment.colour", "config has no field augment.colour; did you mean "
     "augment.color_jitter_prob?"),
    ("linear_eval.epoch", "config has no field linear_eval.epoch; did you "
     "mean linear_eval.epochs?"),
    ("augmnt.hue", "config has no field augmnt; did you mean augment?"),
    ("xyz", "config has no field xyz; check its name in the config file."),
    ("batch_size.x", "config has no field batch_size.x; batch_size is a "
     "value, not a group of fields."),
    ("crop_scale[0]", "config has no field crop_scale; check its name in "
     "the config file."),
    ("augment.crop_scale[0]", None), ("augment.hue", None), ("alpha", None)])
def test_an_unknown_field_is_refused_with_the_nearest_name(path, message):
  config = config_lib.default_config()
  if message is None:
    config_lib.check_field(config, path)
  else:
    with pytest.raises(UserError) as error:
      config_lib.check_field(config, path)
    assert str(error.value) == message


def test_without_a_device_count_the_batch_sizes_need_not_divide():
  config = config_lib.default_config()
  config.batch_size = 100
  config_lib.validate(config)
  with pytest.raises(UserError, match="divisible by the 8 devices"):
    config_lib.validate(config, num_devices=8)


def test_a_bad_number_is_refused_without_importing_jax():
  """Only the choices (method, model, ...) need JAX's modules; they are
  checked last, and so a bad number answers at once."""
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
             "config.method, config.batch_size = 'byol', -8",
             "assert 'config.batch_size=-8' in refusal(config)",
             "assert 'jax' not in sys.modules",
             "config.batch_size = 256",
             "assert 'config.method=' in refusal(config)",
             "assert 'jax' in sys.modules")


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


def test_older_names_read_as_todays():
  recorded = {"momentum": 0.99, "head": "simo", "model": "resnet50",
              "linear_probe": {"epochs": 90}}
  assert config_lib.upgrade_names(recorded) == {
      "ema_momentum": 0.99, "head": "mlp_bn", "model": "resnet50",
      "linear_eval": {"epochs": 90}}
  identity = {"head": "mocov2", "linear_probe.epochs": 90,
              "momentum": 0.9, "ema_momentum": 0.99}
  assert config_lib.upgrade_names(identity) == {
      "head": "mlp", "linear_eval.epochs": 90, "ema_momentum": 0.99}
  assert config_lib.upgrade_names(
      config_lib.default_config().to_dict()) == (
          config_lib.default_config().to_dict())


def test_a_per_device_batch_below_8_names_the_recipe_to_use():
  config = load_config("simo", "imagenet_r50")
  assert config_lib.per_device_batch_advice(config, num_devices=8) is None
  assert config_lib.per_device_batch_advice(config, num_devices=128) == (
      "the per-device batch is 2 (batch_size=256 over 128 devices), too small "
      "to keep an accelerator busy: use configs/simo.py:imagenet_r50_large "
      "(batch 4096, LARS) or a batch_size of at least 1024 with the "
      "learning-rate rule of the README's recipes per hardware.")
  large = load_config("mocov2", "imagenet_r50_large")
  assert config_lib.per_device_batch_advice(large, num_devices=256) is None
  assert "configs/mocov2.py:imagenet_r50_large" in (
      config_lib.per_device_batch_advice(large, num_devices=1024))
