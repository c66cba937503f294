"""eqco_jax.data.catalog: what is known of each dataset without reading it,
and a missing dataset said in one sentence, offline, before TensorFlow."""

import time

import pytest

import helpers
from eqco_jax.core.errors import UserError
from eqco_jax.data import catalog
from eqco_jax.data import sources


def test_facts_and_the_offline_check_need_no_tensorflow(tmp_path):
  result = helpers.run_python(
      "import sys",
      "from eqco_jax.data import catalog",
      f"c = catalog.DataFields(dataset='cifar10', data_dir={str(tmp_path)!r})",
      "try:\n  catalog.check_present(c)",
      "except catalog.DatasetNotFoundError as e:\n  print(e)",
      "assert 'tensorflow' not in sys.modules")
  assert result.stdout.startswith(
      f"Dataset 'cifar10' is not prepared in {tmp_path / 'cifar10'}: run "
      "once with config.download=True (needs network access)")


def test_check_present_passes_what_it_cannot_judge_and_what_is_there(
    tmp_path, fake_tfds_dir):
  for fields in (dict(dataset="digits"),  # Ships in a Python package.
                 dict(dataset="cifar10", data_dir="gs://bucket/tfds"),
                 dict(dataset="cifar10", data_dir=str(tmp_path),
                      download=True),
                 dict(dataset="cifar10", data_dir=fake_tfds_dir)):
    catalog.check_present(helpers.data_config(**fields))
  with pytest.raises(catalog.DatasetNotFoundError):
    catalog.check_present(helpers.data_config(dataset="cifar10",
                                              data_dir=str(tmp_path)))


def test_every_dataset_has_its_facts():
  assert set(catalog.supported()) == {"digits", "imagenet2012", "imagenette",
                                      "cifar10", "cifar100", "stl10",
                                      "image_folder"}
  imagenet = catalog.facts_of("imagenet2012")
  assert (imagenet.num_classes, imagenet.mean) == (1000,
                                                   catalog.IMAGENET_MEAN)
  assert imagenet.manual_files == ("ILSVRC2012_img_train.tar",
                                   "ILSVRC2012_img_val.tar")
  with pytest.raises(UserError, match=r"config.dataset='svhn' is not "
                     r"allowed: use one of \("):
    catalog.facts_of("svhn")


def test_missing_imagenet_says_where_the_tars_go(tmp_path):
  start = time.perf_counter()
  config = helpers.data_config(dataset="imagenet2012", data_dir=str(tmp_path))
  with pytest.raises(catalog.DatasetNotFoundError) as error:
    _ = sources.get_source(config).info
  assert time.perf_counter() - start < 10  # Offline: no network attempt.
  message = str(error.value)
  assert isinstance(error.value, FileNotFoundError)
  assert isinstance(error.value, UserError)
  assert "ILSVRC2012_img_train.tar" in message
  assert "ILSVRC2012_img_val.tar" in message
  assert str(tmp_path / "downloads" / "manual") in message
  assert "download=True" in message and message.count("\n") == 0
  config.manual_dir = "/my/tars"
  with pytest.raises(catalog.DatasetNotFoundError, match="into /my/tars"):
    _ = sources.get_source(config).info


def test_missing_small_dataset_says_how_to_download(tmp_path):
  config = helpers.data_config(dataset="cifar100", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError,
                     match=r"'cifar100' is not prepared .*download=True"):
    helpers.pretrain_numpy(config)
