"""Image folders as torchvision's ``ImageFolder`` (and MoCo's and SiMo's own
code) read them: which files a split holds, their labels, and their bytes.

``ROOT/<split>/<CLASS>/.../<image>`` is an image of class CLASS;
``ROOT/<split>/<image>`` (directly in the split's folder) has no label (-1).
The classes are the sorted names of the class folders of the pretraining
split, so label i means what it means to ``ImageFolder``. Images are the
files ending in one of :data:`IMAGE_EXTENSIONS` (any case); hidden files and
folders are left out. ``ROOT`` is a local folder or a URL (``gs://...``,
listed and read through fsspec).

Listing is the slow part at ImageNet's scale (1.28 M files), so a run lists
a split once and keeps the list in its workdir (see ``sources``); a list is
sorted, so it depends on the files only, never on the order a file system
returns them. Each entry is ``[path, size]``: a file whose size changed
between a run and its resume is read as unreadable (counted and named), not
as another image under the same name.
"""

from __future__ import annotations

import collections
import os

import fsspec
import numpy as np
from absl import logging

from eqco_jax.core.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
UNLABELLED = -1


def is_url(location: str) -> bool:
  return "://" in location


def split_folder(root: str, split: str) -> str:
  """``ROOT/<split>`` (a URL stays one)."""
  return f"{root.rstrip('/')}/{split}" if is_url(root) else os.path.join(
      os.path.abspath(os.path.expanduser(root)), split)


def _is_image(relative: str) -> bool:
  parts = relative.split("/")
  return (relative.lower().endswith(IMAGE_EXTENSIONS)
          and not any(part.startswith(".") for part in parts))


# An entry of a split's list: [path relative to the split, size in bytes].
Entry = list


def _local_files(folder: str) -> dict[str, int]:
  files = {}
  for directory, subfolders, names in os.walk(folder, followlinks=True):
    subfolders[:] = [s for s in subfolders if not s.startswith(".")]
    relative = os.path.relpath(directory, folder)
    prefix = "" if relative == "." else relative.replace(os.sep, "/") + "/"
    for name in names:
      try:
        files[prefix + name] = os.path.getsize(os.path.join(directory, name))
      except OSError:  # gone since, or a broken link: unreadable
        files[prefix + name] = -1
  return files


def _remote_files(folder: str) -> dict[str, int]:
  filesystem, path = fsspec.core.url_to_fs(folder)
  path = path.rstrip("/")
  return {name[len(path) + 1:]: int(info.get("size", -1))
          for name, info in filesystem.find(path, detail=True).items()}


def _left_out(files: list[str]) -> str:
  """What the files that are not images are, in a few words."""
  kinds = collections.Counter(
      "hidden" if any(p.startswith(".") for p in f.split("/"))
      else os.path.splitext(f)[1].lower() or "no extension" for f in files)
  return ", ".join(f"{n} {kind}" for kind, n in kinds.most_common(5))


def list_images(root: str, split: str) -> list[Entry]:
  """The images of ``ROOT/<split>``: ``[path, size]``, paths relative to it,
  '/'-separated, sorted; files that are not images are left out, in one log
  line. Raises UserError (one sentence) when the folder does not exist or
  holds no image."""
  folder = split_folder(root, split)
  try:
    if is_url(folder):
      files = _remote_files(folder)
    elif os.path.isdir(folder):
      files = _local_files(folder)
    else:
      files = []
  except OSError as error:
    raise UserError(f"Cannot list the image folder {folder} ({error}); "
                    "check config.data_dir and your access to it.") from None
  images = sorted([f, size] for f, size in files.items() if _is_image(f))
  others = [f for f in files if not _is_image(f)]
  if others:
    logging.info("Left out %d file(s) of %s that are not images (%s).",
                 len(others), folder, _left_out(others))
  if not images:
    raise UserError(
        f"No images in {folder} (split {split!r} of config.dataset="
        f"'image_folder'); put JPEG or PNG files in {folder}/CLASS/ or "
        f"directly in {folder}, or set config.data_dir to the folder that "
        "holds it.")
  return images


def class_folder(relative: str) -> str:
  """The class folder of an image (its first folder), '' if it has none."""
  head, _, rest = relative.partition("/")
  return head if rest else ""


def classes_of(images: list[str]) -> tuple[str, ...]:
  """The sorted class folder names of a split's images."""
  return tuple(sorted({class_folder(f) for f in images} - {""}))


def labels_of(images: list[str], classes: tuple[str, ...], *,
              folder: str) -> np.ndarray:
  """int32 [N]: each image's index in ``classes``, -1 for unlabelled ones.

  Raises UserError when an image's class folder is not one of ``classes``
  (a class that the pretraining split does not have).
  """
  index = {name: i for i, name in enumerate(classes)}
  labels = np.empty(len(images), np.int32)
  for i, image in enumerate(images):
    name = class_folder(image)
    if name and name not in index:
      raise UserError(
          f"{folder}/{name}/ is a class that the pretraining split's folder "
          f"does not have (its classes: {', '.join(classes[:5])}"
          f"{'...' if len(classes) > 5 else ''}); give both splits the same "
          "class folders.")
    labels[i] = index[name] if name else UNLABELLED
  return labels


def read_url(url: bytes) -> bytes:
  """The bytes of the file at ``url`` (for ``tf.numpy_function``), read in
  one request, without a read-ahead cache."""
  filesystem, path = fsspec.core.url_to_fs(url.decode())
  return filesystem.cat_file(path)
