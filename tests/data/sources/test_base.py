"""eqco_jax.data.sources: the interface every dataset's source satisfies,
the registry, and the splits of the roles."""

import inspect

import pytest

from helpers import data_config as _config
from eqco_jax.core.errors import UserError
from eqco_jax.data import catalog
from eqco_jax.data import sources


@pytest.mark.parametrize("name", tuple(catalog.FACTS))
def test_every_registered_source_satisfies_the_interface(name):
  """(Image folders and tfds:NAME learn their classes when they read the
  data: tests/data/test_folders.py.)"""
  source = sources.get_source(_config(dataset=name))  # Reads nothing.
  assert isinstance(source, sources.Source) and source.name == name
  facts = source.facts
  for role in sources.ROLES:
    split = source.split(role)
    assert isinstance(split, sources.Split) and split.name
    assert split.labelled_only == (role != sources.PRETRAIN)
  assert facts.num_classes >= 2 and facts.image_size >= 8
  assert len(facts.mean) == len(facts.std) == 3
  assert all(0 < m < 1 for m in facts.mean) and all(0 < s < 1
                                                    for s in facts.std)
  assert 0 < facts.eval_crop_fraction <= 1
  assert not inspect.isabstract(type(source))  # Every stream implemented.


def test_unknown_dataset_is_one_sentence_naming_the_choices():
  with pytest.raises(UserError) as error:
    sources.get_source(_config(dataset="svhn"))
  message = str(error.value)
  assert message.startswith("config.dataset='svhn' is not allowed: use one "
                            "of (")
  assert "'cifar10'" in message and "'digits'" in message
  assert message.endswith("or tfds:NAME for any other TFDS dataset.")
  assert "'image_folder'" in message and ". " not in message
  assert "\n" not in message


def test_split_defaults_and_overrides():
  stl = sources.get_source(_config(dataset="stl10"))
  assert stl.split(sources.PRETRAIN) == sources.Split("unlabelled")
  assert stl.split(sources.EVAL_TRAIN) == sources.Split("train",
                                                        labelled_only=True)
  imagenet = sources.get_source(
      _config(dataset="imagenet2012", eval_test_split="train[:1000]"))
  assert imagenet.split(sources.EVAL_TEST).name == "train[:1000]"
  assert imagenet.split(sources.PRETRAIN).name == "train"
  with pytest.raises(UserError, match="Unknown split role 'val'"):
    imagenet.split("val")
