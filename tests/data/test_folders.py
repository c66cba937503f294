"""eqco_jax.data.folders: which files of an image folder are images and
what their labels are, as torchvision's ``ImageFolder`` says, on real JPEGs
and PNGs; a missing or empty folder in one sentence."""

from __future__ import annotations

import logging

import pytest

import torch_models
from helpers import LoggedWarnings, folder_config
from eqco_jax.core.errors import UserError
from eqco_jax.data import catalog
from eqco_jax.data import folders
from eqco_jax.data import pipeline
from eqco_jax.data import sources



def test_the_lists_and_labels_are_torchvisions_imagefolder(image_folder):
  root = image_folder.root
  (root / "train" / ".DS_Store").write_bytes(b"x")  # hidden: left out
  (root / "train" / "notes.txt").write_text("not an image")
  try:
    source = sources.get_source(folder_config(root))
    with LoggedWarnings(level=logging.INFO) as lines:
      images = source.images("train")
    listed = folders.list_images(str(root), "train")
  finally:
    (root / "train" / ".DS_Store").unlink()
    (root / "train" / "notes.txt").unlink()
  assert len(images) == 36 and images == sorted(images)
  assert [name for name, _ in listed] == images and all(
      size == (root / "train" / name).stat().st_size for name, size in listed)
  assert [m for m in lines.messages if m.startswith("Left out")] == [
      f"Left out 2 file(s) of {root / 'train'} that are not images (1 "
      "hidden, 1 .txt)."]
  assert set(image_folder.unlabelled) <= set(images)
  torchvision = torch_models.import_torchvision()
  for folder in ("train", "val"):
    reference = torchvision.datasets.ImageFolder(str(root / folder))
    assert source.classes == tuple(reference.classes)
    paths, labels, _ = source._examples(source.split(sources.EVAL_TRAIN) if
                                     folder == "train" else
                                     source.split(sources.EVAL_TEST))
    assert [(str(root / folder / p), int(l)) for p, l in zip(paths, labels)
            ] == [(p, l) for p, l in reference.samples]
  info = source.info
  assert (info.num_train_examples, info.num_classes) == (36, 4)
  assert (info.mean, info.eval_crop_fraction) == (catalog.IMAGENET_MEAN,
                                                  0.875)
  # Pretraining reads the unlabelled images too; evaluation does not.
  assert source.num_examples(source.split(sources.PRETRAIN)) == 36
  assert pipeline.num_eval_examples(source, "train") == 32
  assert pipeline.num_eval_examples(source, "test") == 12
  mean = folder_config(root, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
  assert sources.get_source(mean).info.std == (0.25, 0.25, 0.25)


def test_missing_or_empty_folders_are_one_sentence(tmp_path):
  with pytest.raises(UserError, match="not a folder; set config.data_dir"):
    catalog.check_present(folder_config(tmp_path / "nowhere"))
  with pytest.raises(UserError, match="config.data_dir, which is not set"):
    catalog.check_present(folder_config(tmp_path, data_dir=None))
  (tmp_path / "train").mkdir()
  with pytest.raises(UserError, match="No images in .*train"):
    folders.list_images(str(tmp_path), "train")
  (tmp_path / "val" / "zebra").mkdir(parents=True)
  with pytest.raises(UserError, match="zebra/ is a class that the "
                                      "pretraining split's folder does not"):
    folders.labels_of(["zebra/1.jpg"], ("cat",),
                      folder=str(tmp_path / "val"))
