"""eqco_jax.program.main (``python -m eqco_jax.main``) as a user types it:
every field of every config file and variant, set from the command line,
reaches the run; a missing dataset stops before the heavy imports.

Each field case is one subprocess with ``--print_config`` (the config after
overrides, printed as JSON before any data, device or workdir is touched)
and one override per field, every value different from the variant's.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys

import ml_collections
import pytest

from helpers import ROOT, config_module

CONFIG_FILES = ("simo.py", "mocov2.py", "quickstart.py", "linear_eval.py")


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


def changed(value, field_type):
  """A value of ``field_type`` that differs from ``value``, and its flag text."""
  if field_type is bool:
    return (not value), str(not value)
  if field_type is int:
    new = 7 if value is None else value + 3
    return new, str(new)
  if field_type is float:
    new = 0.375 if value is None else value * 1.5 + 0.25
    return new, repr(new)
  if field_type is str:
    new = "/some/dir" if value is None else value + "_x"
    return new, new
  if field_type is tuple:
    items = [changed(item, type(item)) for item in value]
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
  for field, value, field_type in leaves(config):
    new, text = changed(value, field_type)
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


@pytest.mark.parametrize("field,value", [
    ("data_dir", "/data/tfds"), ("manual_dir", "/data/tars"),
    ("num_negatives", "16"), ("bn_group_size", "32"),
    ("train_split", "train[:10%]"), ("eval_train_split", "train[10%:]"),
    ("eval_test_split", "validation"), ("eqco", "False")])
def test_fields_that_default_to_none_take_a_value(field, value):
  result = print_config("configs/simo.py:imagenet_r50", f"--config.{field}={value}")
  assert result.returncode == 0, result.stderr[-2000:]
  got = json.loads(result.stdout)[field]
  assert str(got) == value


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
