"""Host throughput of the two-view pretraining pipeline against bare decoding.

Makes a few hundred ImageNet-sized JPEGs once (about 500x375, 1/f "pink"
noise, whose spectrum is that of natural images, so they compress and decode
like photographs: ~120 KB at quality 90), caches them in a temp dir, then
measures on the same files and cores, alternating the two:

* ``views_per_sec``: the full pretraining pipeline of the config's data
  fields (``eqco_jax.data.pipeline.pretrain_views``: fused decode-and-crop,
  resize, flip, and on the host unless ``augment.on_device`` colour jitter,
  grayscale and blur; two views per image);
* ``decode_crop_views_per_sec``: bare fused decode-and-crop-and-resize of one
  view per image, the host's floor;
* ``folder_views_per_sec`` and ``tfrecord_views_per_sec``: the full pipeline
  reading the same JPEGs from disk, as an image folder (one file each,
  ``config.dataset='image_folder'``) and as a prepared TFDS dataset
  (TFRecord shards, ``config.dataset='tfds:NAME'``), through their sources'
  training streams.

The last line printed is one JSON object.

  python -m benchmarks.input_pipeline [--config=configs/simo.py:imagenet_r50]
      [--config.FIELD=VALUE ...] [--batches=10 --repeats=3]  # repo root
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import pathlib
import tempfile
import time

import numpy as np
import tensorflow as tf
from absl import flags
from absl import logging

from ml_collections import config_flags

from eqco_jax.data import augment
from eqco_jax.data import catalog
from eqco_jax.data import pipeline
from eqco_jax.data import sources
from eqco_jax.data.tfdata import as_written
from eqco_jax.program.commands import cli


def pink_noise_image(rng: np.random.Generator, height: int,
                     width: int) -> np.ndarray:
  """uint8 [H, W, 3] with a 1/f amplitude spectrum and correlated channels."""
  fy = np.fft.fftfreq(height)[:, None]
  fx = np.fft.rfftfreq(width)[None, :]
  freq = np.hypot(fx, fy)
  freq[0, 0] = 1.0
  amplitude = 1.0 / freq
  amplitude[0, 0] = 0.0
  planes = [np.fft.irfft2(amplitude * (rng.normal(size=amplitude.shape) + 1j *
                                       rng.normal(size=amplitude.shape)),
                          s=(height, width)) for _ in range(3)]
  mixing = np.eye(3) + 0.3 * rng.normal(size=(3, 3))
  image = np.stack(planes, -1) @ mixing
  image = (image - image.mean()) / image.std()
  return np.clip(128 + 50 * image, 0, 255).astype(np.uint8)


def make_jpegs(directory: pathlib.Path, num: int, seed: int = 0
               ) -> list[bytes]:
  """``num`` JPEGs of about 500x375, made once and cached in ``directory``."""
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  files = []
  for i in range(num):
    path = directory / f"{i:05d}.jpg"
    if not path.exists():
      height, width = (375, 500) if i % 4 else (500, 375)
      height += int(rng.integers(-20, 21))
      width += int(rng.integers(-20, 21))
      encoded = tf.io.encode_jpeg(pink_noise_image(rng, height, width),
                                  quality=90).numpy()
      tmp = path.with_suffix(".tmp")
      tmp.write_bytes(encoded)
      tmp.rename(path)
    files.append(path.read_bytes())
  return files


def keyed_source(jpegs: list[bytes]) -> tf.data.Dataset:
  """Endless {'image': encoded bytes, 'label', 'key'} from memory."""
  ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat().enumerate()
  return ds.map(as_written(
      lambda key, image: {"image": image, "label": 0, "key": key}))


def write_folder(root: pathlib.Path, jpegs: list[bytes]) -> None:
  """The JPEGs as an image folder ``root/train/c{i % 10}/{i}.jpg``."""
  for i, data in enumerate(jpegs):
    path = root / "train" / f"c{i % 10}" / f"{i:05d}.jpg"
    if not path.exists():
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(data)


TFDS_NAME = "bench_jpegs"


def write_tfds(data_dir: pathlib.Path, jpegs: list[bytes]) -> None:
  """The JPEGs as a prepared TFDS dataset ``bench_jpegs`` (TFRecord shards,
  the encoded bytes stored as they are)."""
  import tensorflow_datasets as tfds
  if list(data_dir.glob(f"{TFDS_NAME}/*/dataset_info.json")):
    return
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(), "label": tfds.features.ClassLabel(
          num_classes=10)})
  train = tf.data.Dataset.from_tensor_slices({
      "image": jpegs, "label": np.arange(len(jpegs)) % 10})
  tfds.dataset_builders.TfDataBuilder(
      name=TFDS_NAME, version="1.0.0", split_datasets={"train": train},
      features=features, data_dir=str(data_dir)).download_and_prepare()


def views_per_sec(ds: tf.data.Dataset, views_per_batch: int, warmup: int,
                  batches: int) -> float:
  it = iter(ds)
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * views_per_batch / (time.perf_counter() - start)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def define_flags(flag_values: flags.FlagValues) -> None:
  """The benchmark's flags, on ``flag_values``."""
  define = dict(flag_values=flag_values)
  config_flags.DEFINE_config_file(
      "config", os.path.join(ROOT, "configs", "simo.py:imagenet_r50"),
      "The recipe whose data fields are timed (image size, batch, "
      "augmentation): FILE.py[:VARIANT].", lock_config=True, **define)
  flags.DEFINE_integer("num_images", 300, "JPEGs to make and read.", **define)
  flags.DEFINE_integer("batches", 10, "Timed batches per repeat.", **define)
  flags.DEFINE_integer("warmup", 2, "Untimed batches per repeat.", **define)
  flags.DEFINE_integer("repeats", 3, "Alternating repeats of the pipelines.",
                       **define)
  flags.DEFINE_string("cache_dir", os.path.join(
      tempfile.gettempdir(), "eqco_jax_bench_jpegs_v1"), "Where the JPEGs "
      "are kept between runs.", **define)


def main(args: flags.FlagValues) -> None:

  jpegs = make_jpegs(pathlib.Path(args.cache_dir), args.num_images)
  fields = catalog.DataFields.of(args.config)
  aug = fields.augment
  size, batch = fields.image_size, fields.batch_size

  def full() -> tf.data.Dataset:
    ds = pipeline.pretrain_views(keyed_source(jpegs), fields, batch)
    return ds.prefetch(2)

  def bare() -> tf.data.Dataset:
    seed = pipeline.derived_seed(fields.seed, 0)

    def crop(example: dict[str, tf.Tensor]) -> tf.Tensor:
      return augment.random_resized_crop_flip(
          example["image"], tf.stack([tf.constant(seed, tf.int64),
                                      example["key"]]),
          size=size, scale=tuple(aug.crop_scale),
          ratio=tuple(aug.crop_ratio), flip_prob=0.0)

    ds = keyed_source(jpegs).map(as_written(crop),
                                 num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch, drop_remainder=True).prefetch(2)

  cache = pathlib.Path(args.cache_dir)
  write_folder(cache / "folder", jpegs)
  write_tfds(cache / "tfds", jpegs)

  def from_disk(dataset: str, data_dir: pathlib.Path) -> tf.data.Dataset:
    disk = fields.replace(dataset=dataset, data_dir=str(data_dir),
                          shuffle_buffer=batch, mean=(), std=())
    return pipeline.pretrain_dataset(sources.get_source(disk),
                                     process_index=0, process_count=1)

  runs = {"views_per_sec": full, "decode_crop_views_per_sec": bare,
          "folder_views_per_sec": lambda: from_disk(
              "image_folder", cache / "folder"),
          "tfrecord_views_per_sec": lambda: from_disk(
              f"tfds:{TFDS_NAME}", cache / "tfds")}
  measured = {name: [] for name in runs}
  for _ in range(args.repeats):
    for name, make in runs.items():
      views = batch if name == "decode_crop_views_per_sec" else 2 * batch
      measured[name].append(views_per_sec(make(), views, args.warmup,
                                          args.batches))
    logging.info("  ".join(f"{name} {values[-1]:.1f}"
                           for name, values in measured.items()))
  best = {name: round(max(values), 1) for name, values in measured.items()}
  result = {
      **best,
      "ratio": round(best["views_per_sec"] /
                     best["decode_crop_views_per_sec"], 3),
      "cores": len(os.sched_getaffinity(0)),
      "batch_size": batch,
      "image_size": size,
      "num_images": len(jpegs),
      "mean_jpeg_kb": round(float(np.mean([len(j) for j in jpegs])) / 1e3, 1),
      "tensorflow": tf.__version__,
  }
  print(json.dumps(result))


if __name__ == "__main__":
  cli.run(main, define_flags)
