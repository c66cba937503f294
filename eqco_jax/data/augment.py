"""MoCo v2 / SiMo image augmentation on the host, in tf.data.

Two stages, each where it is cheapest:

* per example (inside ``Dataset.map``): decode fused with the
  RandomResizedCrop window, resize, horizontal flip, and the sampling of the
  colour parameters (``sample_color_params``);
* per batch (after ``Dataset.batch``): colour jitter in a per-example random
  order, grayscale and Gaussian blur (``color_augment_batch``), one
  XLA-compiled function per batch that runs only the ops each image drew.

All randomness is stateless and comes from per-example seeds (int64 [2]), so
a seed gives the same pixels on any host. Images are uint8 at both ends; the
colour stage computes in float32 on [0, 1], channel-planar.
"""

from __future__ import annotations

import functools
from typing import Callable

import ml_collections
import tensorflow as tf

from eqco_jax.core.device_augment import blur_kernel_size
from eqco_jax.core.device_augment import LUMA
from eqco_jax.core.device_augment import NUM_JITTER_OPS
from eqco_jax.data import unreadable

Window = tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]  # y, x, h, w.
Params = dict[str, tf.Tensor]


def split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
  """``num`` independent seeds int64 [2] derived from one."""
  return tf.unstack(tf.random.experimental.stateless_split(seed, num))


# ------------------------------------------------------- crops and flips.


def sample_crop_window(image_shape: tf.Tensor, seed: tf.Tensor,
                       scale: tuple[float, float],
                       ratio: tuple[float, float],
                       attempts: int = 10) -> Window:
  """RandomResizedCrop window, as torchvision samples it.

  Area fraction ~ U[scale], aspect ratio w/h log-uniform in ``ratio``; the
  first of ``attempts`` draws that fits is used, at a uniform offset; if none
  fits, the largest centred crop whose ratio is within ``ratio``.
  """
  height = tf.cast(image_shape[0], tf.float32)
  width = tf.cast(image_shape[1], tf.float32)
  area_seed, ratio_seed, offset_seed = split_seed(seed, 3)
  area = height * width * tf.random.stateless_uniform(
      [attempts], area_seed, scale[0], scale[1])
  log_ratio = tf.math.log(tf.constant(ratio, tf.float32))
  aspect = tf.exp(tf.random.stateless_uniform(
      [attempts], ratio_seed, log_ratio[0], log_ratio[1]))
  w = tf.round(tf.sqrt(area * aspect))
  h = tf.round(tf.sqrt(area / aspect))
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32))  # 0 when nothing fits.

  # Fallback: the whole image, narrowed to the nearest allowed ratio.
  image_ratio = width / height
  low, high = min(ratio), max(ratio)
  fallback_w = tf.where(image_ratio > high, tf.round(height * high), width)
  fallback_h = tf.where(image_ratio < low, tf.round(width / low), height)
  found = tf.reduce_any(fits)
  h = tf.where(found, h[first], fallback_h)
  w = tf.where(found, w[first], fallback_w)
  offset = tf.random.stateless_uniform([2], offset_seed)
  y = tf.where(found, tf.floor(offset[0] * (height - h + 1)),
               tf.floor((height - h) / 2))
  x = tf.where(found, tf.floor(offset[1] * (width - w + 1)),
               tf.floor((width - w) / 2))
  return tuple(tf.cast(v, tf.int32) for v in (y, x, h, w))


def center_crop_window(image_shape: tf.Tensor, fraction: float) -> Window:
  """Centred square whose side is ``fraction`` of the shorter side."""
  height, width = image_shape[0], image_shape[1]
  side = tf.cast(
      tf.round(fraction * tf.cast(tf.minimum(height, width), tf.float32)),
      tf.int32)
  return (height - side) // 2, (width - side) // 2, side, side


def decode_and_crop(image: tf.Tensor,
                    window_fn: Callable[[tf.Tensor], Window]) -> tf.Tensor:
  """Crops ``window_fn(image shape)`` out of an image: uint8 [h, w, 3].

  ``image`` is encoded bytes (a JPEG is decoded fused with its crop, other
  formats are decoded whole, then cropped) or uint8 [H, W, 3].
  """

  def crop(decoded: tf.Tensor) -> tf.Tensor:
    y, x, h, w = window_fn(tf.shape(decoded))
    return decoded[y:y + h, x:x + w]

  if image.dtype != tf.string:
    return crop(image)

  def jpeg() -> tf.Tensor:
    whole = unreadable.whole_jpeg(image)  # one cut short: unreadable
    window = tf.stack(window_fn(tf.image.extract_jpeg_shape(whole)))
    return tf.image.decode_and_crop_jpeg(whole, window, channels=3)

  def other() -> tf.Tensor:
    return crop(tf.image.decode_image(image, channels=3,
                                      expand_animations=False))

  return tf.cond(tf.io.is_jpeg(image), jpeg, other)


def to_uint8(images: tf.Tensor) -> tf.Tensor:
  """Rounds float pixels on the [0, 255] scale to uint8."""
  return tf.cast(tf.clip_by_value(tf.round(images), 0.0, 255.0), tf.uint8)


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """Bilinear resize to float32 [size, size, 3] on the [0, 255] scale."""
  resized = tf.image.resize(image, (size, size), method="bilinear")
  return tf.ensure_shape(resized, (size, size, 3))


def random_resized_crop_flip(image: tf.Tensor, seed: tf.Tensor, *, size: int,
                             scale: tuple[float, float],
                             ratio: tuple[float, float],
                             flip_prob: float) -> tf.Tensor:
  """RandomResizedCrop to ``size``, then horizontal flip: uint8 [S, S, 3]."""
  crop_seed, flip_seed = split_seed(seed, 2)
  cropped = decode_and_crop(
      image, lambda shape: sample_crop_window(shape, crop_seed, scale, ratio))
  resized = _resize(cropped, size)
  flip = tf.random.stateless_uniform([], flip_seed) < flip_prob
  resized = tf.cond(flip, lambda: tf.reverse(resized, [1]), lambda: resized)
  return to_uint8(resized)


def center_crop_resize(image: tf.Tensor, *, size: int,
                       crop_fraction: float) -> tf.Tensor:
  """Evaluation view: centre crop, then resize: uint8 [size, size, 3].

  ``crop_fraction`` 0.875 is "resize 256, centre crop 224"; with 1.0 an image
  already of side ``size`` passes through unchanged.
  """
  cropped = decode_and_crop(
      image, lambda shape: center_crop_window(shape, crop_fraction))
  shape = tf.shape(cropped)
  return tf.cond(
      tf.logical_and(shape[0] == size, shape[1] == size),
      lambda: tf.ensure_shape(cropped, (size, size, 3)),
      lambda: to_uint8(_resize(cropped, size)))


# ------------------------------------------------------ colour parameters.


def sample_color_params(seed: tf.Tensor,
                        cfg: ml_collections.ConfigDict) -> Params:
  """One view's colour parameters (scalars; ``order`` is int32 [4]).

  jitter ~ Bernoulli(color_jitter_prob); brightness, contrast and saturation
  factors ~ U[max(0, 1 - s), 1 + s]; hue shift ~ U[-hue, hue] in turns;
  order: uniform random permutation of the four jitter ops;
  grayscale ~ Bernoulli(grayscale_prob); blur ~ Bernoulli(blur_prob);
  sigma ~ U[blur_sigma] in pixels.
  """
  seeds = split_seed(seed, 9)

  def uniform(i: int, low: float = 0.0, high: float = 1.0) -> tf.Tensor:
    return tf.random.stateless_uniform([], seeds[i], low, high)

  def factor(i: int, strength: float) -> tf.Tensor:
    return uniform(i, max(0.0, 1.0 - strength), 1.0 + strength)

  return {
      "jitter": uniform(0) < cfg.color_jitter_prob,
      "brightness": factor(1, cfg.brightness),
      "contrast": factor(2, cfg.contrast),
      "saturation": factor(3, cfg.saturation),
      "hue": uniform(4, -cfg.hue, cfg.hue),
      "order": tf.argsort(
          tf.random.stateless_uniform([NUM_JITTER_OPS], seeds[5])),
      "grayscale": uniform(6) < cfg.grayscale_prob,
      "blur": uniform(7) < cfg.blur_prob,
      "sigma": uniform(8, cfg.blur_sigma[0], cfg.blur_sigma[1]),
  }


# ------------------------------- colour ops on one planar image [3, H, W].


def _luma(x: tf.Tensor) -> tf.Tensor:
  """[3, H, W] -> [H, W]."""
  return LUMA[0] * x[0] + LUMA[1] * x[1] + LUMA[2] * x[2]


def _blend(x: tf.Tensor, other: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """factor * x + (1 - factor) * other, clipped to [0, 1]."""
  return tf.clip_by_value(other + factor * (x - other), 0.0, 1.0)


def _brightness(x: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  return tf.clip_by_value(factor * x, 0.0, 1.0)


def _contrast(x: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  return _blend(x, tf.reduce_mean(_luma(x)), factor)


def _saturation(x: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  return _blend(x, _luma(x)[None], factor)


def _hue(x: tf.Tensor, delta: tf.Tensor) -> tf.Tensor:
  """Rotates the HSV hue by ``delta`` turns (value and saturation kept)."""
  r, g, b = x[0], x[1], x[2]
  value = tf.maximum(tf.maximum(r, g), b)
  chroma = value - tf.minimum(tf.minimum(r, g), b)
  safe_chroma = tf.where(chroma > 0, chroma, 1.0)
  hue = tf.where(value == r, (g - b) / safe_chroma,
                 tf.where(value == g, (b - r) / safe_chroma + 2.0,
                          (r - g) / safe_chroma + 4.0))
  hue = hue / 6.0 + delta
  hue = 6.0 * (hue - tf.floor(hue))  # In [0, 6).
  saturation = chroma / tf.where(value > 0, value, 1.0)

  def channel(n: float) -> tf.Tensor:
    k = n + hue
    k = tf.where(k >= 6.0, k - 6.0, k)
    return value - value * saturation * tf.clip_by_value(
        tf.minimum(k, 4.0 - k), 0.0, 1.0)

  return tf.stack([channel(5.0), channel(3.0), channel(1.0)])


def _grayscale(x: tf.Tensor) -> tf.Tensor:
  return tf.broadcast_to(_luma(x)[None], tf.shape(x))


def gaussian_kernel(sigma: tf.Tensor, size: int) -> tf.Tensor:
  """Normalised 1-D Gaussian [size] of standard deviation ``sigma`` pixels."""
  radius = (size - 1) // 2
  taps = tf.range(-radius, radius + 1, dtype=tf.float32)
  return tf.nn.softmax(-tf.square(taps) / (2.0 * tf.square(sigma)))


def _blur(x: tf.Tensor, sigma: tf.Tensor, size: int) -> tf.Tensor:
  """Separable Gaussian blur of [C, H, W] with reflect padding."""
  weights = tf.unstack(gaussian_kernel(sigma, size))
  radius = (size - 1) // 2
  height, width = x.shape[1], x.shape[2]
  padded = tf.pad(x, [[0, 0], [radius, radius], [0, 0]], "REFLECT")
  x = tf.add_n([w * padded[:, j:j + height] for j, w in enumerate(weights)])
  padded = tf.pad(x, [[0, 0], [0, 0], [radius, radius]], "REFLECT")
  return tf.add_n([w * padded[:, :, j:j + width]
                   for j, w in enumerate(weights)])


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)
_FACTOR_KEYS = ("brightness", "contrast", "saturation", "hue")


def color_augment_image(image: tf.Tensor, params: Params,
                        cfg: ml_collections.ConfigDict) -> tf.Tensor:
  """Jitter, grayscale and blur of one uint8 [H, W, 3] image -> uint8.

  Order: jitter (its four ops in ``params['order']``), grayscale, blur
  (MoCo v2), or jitter, blur, grayscale when ``cfg.blur_before_grayscale``
  (SiMo). Every op runs only for the images that drew it.
  """
  x = tf.transpose(tf.cast(image, tf.float32) / 255.0, (2, 0, 1))
  kernel_size = blur_kernel_size(x.shape[1], cfg.blur_kernel_fraction)

  def jitter(x: tf.Tensor) -> tf.Tensor:
    for position in range(NUM_JITTER_OPS):
      branches = [
          (lambda op=op, key=key: op(x, params[key]))
          for op, key in zip(_JITTER_OPS, _FACTOR_KEYS)]
      x = tf.switch_case(params["order"][position], branches)
    return x

  def gray(x: tf.Tensor) -> tf.Tensor:
    return tf.cond(params["grayscale"], lambda: _grayscale(x), lambda: x)

  def blur(x: tf.Tensor) -> tf.Tensor:
    return tf.cond(params["blur"],
                   lambda: _blur(x, params["sigma"], kernel_size), lambda: x)

  x = tf.cond(params["jitter"], lambda: jitter(x), lambda: x)
  x = gray(blur(x)) if cfg.blur_before_grayscale else blur(gray(x))
  return to_uint8(tf.transpose(x, (1, 2, 0)) * 255.0)


def color_augment_batch(images: tf.Tensor, params: Params,
                        cfg: ml_collections.ConfigDict) -> tf.Tensor:
  """``color_augment_image`` over uint8 [B, H, W, 3] with batched params.

  ``params`` are ``sample_color_params`` outputs batched to [B] ([B, 4] for
  ``order``). Compiled with XLA; call it inside ``Dataset.map``.
  """
  return _compiled_batch_fn(float(cfg.blur_kernel_fraction),
                            bool(cfg.blur_before_grayscale))(images, params)


@functools.lru_cache(maxsize=None)
def _compiled_batch_fn(blur_kernel_fraction: float,
                       blur_before_grayscale: bool
                       ) -> Callable[[tf.Tensor, Params], tf.Tensor]:
  """One compiled function per setting of the fields the graph reads."""
  fields = ml_collections.ConfigDict({
      "blur_kernel_fraction": blur_kernel_fraction,
      "blur_before_grayscale": blur_before_grayscale})

  @tf.function(jit_compile=True, autograph=False)
  def batch_fn(images: tf.Tensor, params: Params) -> tf.Tensor:
    return tf.map_fn(lambda ex: color_augment_image(ex[0], ex[1], fields),
                     (images, params), fn_output_signature=tf.uint8)

  return batch_fn
