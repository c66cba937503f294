"""eqco_jax.program.commands.main (``python -m eqco_jax.main``) as a user types it:
every field of every config file and variant, set from the command line,
reaches the run; a command-line mistake or a missing dataset stops, in one
sentence, before the heavy imports and the workdir.

Each field case is one subprocess with ``--print_config`` (the config after
overrides, checked and printed as JSON before any data, device or workdir is
touched) and one override per field, every value a valid one different from
the variant's.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from helpers import ROOT, config_module

CONFIG_FILES = ("simo.py", "mocov2.py", "cifar10.py", "quickstart.py",
                "linear_eval.py")


CASES = [(name, variant) for name in CONFIG_FILES
         for variant in config_module(name).VARIANTS]


def leaves(config: ml_collections.ConfigDict, prefix: str = ""):
  """``(dotted name, value, type)`` of every field, nested ones included."""
  for key in sorted(config.keys()):
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value, config.get_type(key)


# Another valid value for each field that names a choice.
ALTERNATIVES = {
    "method": {"simo": "mocov2", "mocov2": "simo"},
    "model": {"resnet10": "resnet18", "resnet18": "resnet34",
              "resnet50": "resnet18"},
    "head": {"mlp_bn": "mlp", "mlp": "mlp_bn"},
    "dtype": {"float32": "bfloat16", "bfloat16": "float32"},
    "optimizer": {"sgd": "lars", "lars": "sgd"}}
# ``--print_config`` checks the config, so every new value is a valid one.
# Two fields keep theirs: a linear evaluation's mode, and symmetric (a SiMo
# switch) where the method becomes MoCo v2; the MoCo v2 configs, which
# become SiMo, set it.
KEPT = ("mode", "symmetric")


def changed(field, value, field_type):
  """A valid value of ``field_type`` that differs from ``value``, and its
  flag text."""
  name = field.split(".")[-1]
  if name in ALTERNATIVES:
    new = ALTERNATIVES[name][value]
    return new, new
  if name == "init_from":  # an existing file (print_config reads none)
    return __file__, __file__
  if field_type is bool:
    return (not value), str(not value)
  if field_type is int:
    new = 8 if value is None or value <= 0 else value * 2
    return new, str(new)
  if field_type is float:
    new = 0.25 if not value else value / 2
    return new, repr(new)
  if field_type is str:
    new = "/some/dir" if value is None else value + "_x"
    return new, new
  if field_type is tuple:
    items = [changed(name, item, type(item)) for item in value]
    return [new for new, _ in items], "(" + ",".join(t for _, t in items) + ")"
  raise AssertionError(f"no override rule for {field_type}")


def print_config(config_arg: str, *overrides: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "eqco_jax.main", f"--config={config_arg}",
       "--print_config", *overrides],
      cwd=ROOT, capture_output=True, text=True, timeout=120)


def check_every_field(name: str, variant: str) -> list[str]:
  config = config_module(name).get_config(variant)
  expected, overrides = {}, []
  becomes_simo = ALTERNATIVES["method"].get(config.get("method")) == "simo"
  for field, value, field_type in leaves(config):
    if field in KEPT and not (field == "symmetric" and becomes_simo):
      continue
    new, text = changed(field, value, field_type)
    expected[field] = new
    overrides.append(f"--config.{field}={text}")
  result = print_config(f"configs/{name}:{variant}", *overrides)
  if result.returncode:
    return [f"{name}:{variant} failed: {result.stderr[-2000:]}"]
  printed = json.loads(result.stdout)
  problems = []
  for field, new in expected.items():
    got = printed
    for part in field.split("."):
      got = got[part]
    if got != new:
      problems.append(f"{name}:{variant} {field}: set {new!r}, run got {got!r}")
  return problems


def test_every_field_of_every_variant_is_settable_from_the_command_line():
  """(--print_config needs no --workdir.)"""
  assert len(CASES) >= 17
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    problems = sum(pool.map(lambda case: check_every_field(*case), CASES), [])
  assert not problems, "\n".join(problems)


NONE_DEFAULTS = {
    "data_dir": "/data/tfds", "manual_dir": "/data/tars",
    "num_negatives": "16", "bn_group_size": "32",
    "train_split": "train[:10%]", "eval_train_split": "train[10%:]",
    "eval_test_split": "validation", "eqco": "False"}


def test_fields_that_default_to_none_take_a_value():
  result = print_config("configs/simo.py:imagenet_r50",
                        *(f"--config.{field}={value}"
                          for field, value in NONE_DEFAULTS.items()))
  assert result.returncode == 0, result.stderr[-2000:]
  printed = json.loads(result.stdout)
  assert {field: str(printed[field]) for field in NONE_DEFAULTS} == (
      NONE_DEFAULTS)


# A command-line mistake, as a user types it: its arguments (WORKDIR stands
# for the workdir) and words its one-sentence message names. None of them
# imports JAX: the schema names its choices itself.
MISTAKES = {
    "missing config file": (
        ["--config=configs/nosuch.py", "--workdir=WORKDIR"],
        ["no config file", "configs/nosuch.py"]),
    "unknown variant": (
        ["--config=configs/simo.py:nosuch", "--workdir=WORKDIR"],
        ["variant 'nosuch'", "imagenet_r50, imagenet_r50_800ep",
         "imagenet_r50_large"]),
    "unknown field": (
        ["--config=configs/quickstart.py", "--config.lerning_rate=0.1",
         "--workdir=WORKDIR"],
        ["no field lerning_rate; did you mean base_learning_rate?"]),
    "unknown nested field": (
        ["--config=configs/quickstart.py", "--config.augment.colour=0.5",
         "--workdir=WORKDIR"],
        ["no field augment.colour; did you mean augment.color_jitter_prob?"]),
    "bad value": (
        ["--config=configs/quickstart.py", "--config.batch_size=-8",
         "--workdir=WORKDIR"],
        ["config.batch_size=-8 is not allowed", "integer >= 2"]),
    "bad choice": (
        ["--config=configs/quickstart.py", "--config.model=vit",
         "--workdir=WORKDIR"],
        ["config.model='vit' is not allowed", "'resnet50'"]),
    "bad linear-evaluation value": (
        ["--config=configs/linear_eval.py", "--config.learning_rate=-1.0",
         "--config.pretrain_workdir=WORKDIR", "--workdir=WORKDIR"],
        ["config.learning_rate=-1.0 is not allowed"]),
    "bad value printed": (
        ["--config=configs/quickstart.py", "--config.batch_size=-8",
         "--print_config"],
        ["config.batch_size=-8 is not allowed"]),
    "missing --workdir": (
        ["--config=configs/quickstart.py"], ["--workdir is missing"]),
    "missing --config": (
        ["--workdir=WORKDIR"], ["--config is missing"]),
    "field without --config": (
        ["--config.batch_size=64", "--workdir=WORKDIR"],
        ["--config.batch_size sets a field of --config, which is missing"]),
    "value of the wrong type": (
        ["--config=configs/quickstart.py", "--config.batch_size=abc",
         "--workdir=WORKDIR"],
        ["--config.batch_size=abc", "invalid literal for int()"]),
    "unknown flag": (
        ["--config=configs/quickstart.py", "--workdirr=WORKDIR"],
        ["unknown flag --workdirr; did you mean --workdir?"]),
    "missing flag file": (
        ["--flagfile=nosuch.flags", "--workdir=WORKDIR"],
        ["cannot read a --flagfile", "nosuch.flags"]),
    "item of a tuple field": (
        ["--config=configs/quickstart.py", "--config.augment.crop_scale[0]=0.3",
         "--workdir=WORKDIR"],
        ["augment.crop_scale[0]", "set a tuple field whole"]),
    "positional argument": (
        ["--config=configs/quickstart.py", "--workdir=WORKDIR", "extra"],
        ["unexpected arguments ['extra']"]),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_a_command_line_mistake_is_one_sentence_before_any_heavy_import(
    mistake, tmp_path):
  args, words = MISTAKES[mistake]
  workdir = str(tmp_path / "run")
  result = subprocess.run(
      [sys.executable, "-X", "importtime", "-m", "eqco_jax.main",
       *(arg.replace("WORKDIR", workdir) for arg in args)],
      cwd=ROOT, capture_output=True, text=True, timeout=60)
  lines = [line for line in result.stderr.splitlines()
           if line.strip() and not line.startswith("import time:")]
  imported = {line.split("|")[-1].strip().split(".")[0]
              for line in result.stderr.splitlines()
              if line.startswith("import time:")}
  assert result.returncode == 1, result.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  assert all(word in lines[0] for word in words), lines[0]
  assert "Traceback" not in result.stderr + result.stdout
  assert "tensorflow" not in imported
  assert "jax" not in imported
  assert not os.path.exists(workdir)


def test_the_imagenet_command_reaches_the_data_layer_and_stops_before_heavy_imports(
    tmp_path):
  workdir = tmp_path / "runs" / "simo"
  result = subprocess.run(
      [sys.executable, "-X", "importtime", "-m", "eqco_jax.main",
       "--config=configs/simo.py:imagenet_r50", f"--workdir={workdir}",
       f"--config.data_dir={tmp_path / 'tfds'}", "--config.num_negatives=16",
       "--config.bn_group_size=32", f"--config.manual_dir={tmp_path / 'tars'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  message = result.stderr.strip().splitlines()[-1]
  assert message == (
      f"error: Dataset 'imagenet2012' is not prepared in "
      f"{tmp_path / 'tfds' / 'imagenet2012'}: put ILSVRC2012_img_train.tar and "
      f"ILSVRC2012_img_val.tar into {tmp_path / 'tars'} (or set "
      "config.manual_dir to where they are) and run once with "
      "config.download=True to prepare it, or set config.data_dir to a TFDS "
      "data_dir where it is prepared.")
  imported = {line.split("|")[-1].strip().split(".")[0]
              for line in result.stderr.splitlines()
              if line.startswith("import time:")}
  assert "eqco_jax" in imported and "tensorflow" not in imported
  assert not workdir.exists()
