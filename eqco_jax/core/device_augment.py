"""Colour augmentation and normalisation on the accelerator, in pure JAX.

The same distributions and the same maths as the host's colour stage
(``data.augment.sample_color_params`` / ``color_augment_image``): colour
jitter in a per-example random order, grayscale, Gaussian blur, in the MoCo v2
or SiMo order. For when the hosts cannot keep up (BYOL did this on TPU pods):
the host then only crops and flips, and the train step calls
``prepare_views`` inside jit.

Every function takes an explicit PRNG key, works on [B, H, W, 3] batches
(vmapped per example) and is jittable. ``augment_config`` is static: close
over it, do not pass it through jit as an argument.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections

Params = dict[str, jax.Array]

# ITU-R 601-2 luma, as PIL's convert('L') and torchvision's rgb_to_grayscale.
LUMA = (0.299, 0.587, 0.114)
NUM_JITTER_OPS = 4  # brightness, contrast, saturation, hue; in this order.


def blur_kernel_size(side: int, fraction: float) -> int:
  """Odd kernel size about ``fraction`` of the image side (224 -> 23)."""
  return 2 * max(int(side * fraction) // 2, 1) + 1


def _standardize(images01: jax.Array, mean: Sequence[float],
                 std: Sequence[float]) -> jax.Array:
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images01 - mean) / std


def normalize(images: jax.Array, mean: Sequence[float],
              std: Sequence[float]) -> jax.Array:
  """uint8 [..., 3] on [0, 255] -> float32 (x / 255 - mean) / std."""
  return _standardize(images.astype(jnp.float32) / 255.0, mean, std)


def sample_color_params(key: jax.Array,
                        cfg: ml_collections.ConfigDict) -> Params:
  """One view's colour parameters; same distributions as the host's."""
  keys = jax.random.split(key, 9)

  def uniform(i: int, low: float = 0.0, high: float = 1.0) -> jax.Array:
    return jax.random.uniform(keys[i], (), jnp.float32, low, high)

  def factor(i: int, strength: float) -> jax.Array:
    return uniform(i, max(0.0, 1.0 - strength), 1.0 + strength)

  return {
      "jitter": uniform(0) < cfg.color_jitter_prob,
      "brightness": factor(1, cfg.brightness),
      "contrast": factor(2, cfg.contrast),
      "saturation": factor(3, cfg.saturation),
      "hue": uniform(4, -cfg.hue, cfg.hue),
      "order": jax.random.permutation(keys[5], NUM_JITTER_OPS),
      "grayscale": uniform(6) < cfg.grayscale_prob,
      "blur": uniform(7) < cfg.blur_prob,
      "sigma": uniform(8, cfg.blur_sigma[0], cfg.blur_sigma[1]),
  }


# --------------------------------- colour ops on one image [H, W, 3] in [0, 1].


def _luma(x: jax.Array) -> jax.Array:
  """[H, W, 3] -> [H, W, 1]; a weighted sum (a matmul would run at reduced
  precision on TPUs and TF32 GPUs)."""
  r, g, b = LUMA
  return r * x[..., 0:1] + g * x[..., 1:2] + b * x[..., 2:3]


def _blend(x: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
  return jnp.clip(other + factor * (x - other), 0.0, 1.0)


def _brightness(x: jax.Array, factor: jax.Array) -> jax.Array:
  return jnp.clip(factor * x, 0.0, 1.0)


def _contrast(x: jax.Array, factor: jax.Array) -> jax.Array:
  return _blend(x, jnp.mean(_luma(x)), factor)


def _saturation(x: jax.Array, factor: jax.Array) -> jax.Array:
  return _blend(x, _luma(x), factor)


def _hue(x: jax.Array, delta: jax.Array) -> jax.Array:
  """Rotates the HSV hue by ``delta`` turns (value and saturation kept)."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  value = jnp.maximum(jnp.maximum(r, g), b)
  chroma = value - jnp.minimum(jnp.minimum(r, g), b)
  safe_chroma = jnp.where(chroma > 0, chroma, 1.0)
  hue = jnp.where(value == r, (g - b) / safe_chroma,
                  jnp.where(value == g, (b - r) / safe_chroma + 2.0,
                            (r - g) / safe_chroma + 4.0))
  hue = hue / 6.0 + delta
  hue = 6.0 * (hue - jnp.floor(hue))
  saturation = chroma / jnp.where(value > 0, value, 1.0)

  def channel(n: float) -> jax.Array:
    k = n + hue
    k = jnp.where(k >= 6.0, k - 6.0, k)
    return value - value * saturation * jnp.clip(
        jnp.minimum(k, 4.0 - k), 0.0, 1.0)

  return jnp.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)


def _grayscale(x: jax.Array) -> jax.Array:
  return jnp.broadcast_to(_luma(x), x.shape)


def gaussian_kernel(sigma: jax.Array, size: int) -> jax.Array:
  """Normalised 1-D Gaussian [size] of standard deviation ``sigma`` pixels."""
  radius = (size - 1) // 2
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  return jax.nn.softmax(-jnp.square(taps) / (2.0 * jnp.square(sigma)))


def _blur(x: jax.Array, sigma: jax.Array, size: int) -> jax.Array:
  """Separable Gaussian blur of [H, W, C] with reflect padding."""
  weights = gaussian_kernel(sigma, size)
  radius = (size - 1) // 2
  height, width = x.shape[0], x.shape[1]
  padded = jnp.pad(x, ((radius, radius), (0, 0), (0, 0)), mode="reflect")
  x = sum(weights[j] * padded[j:j + height] for j in range(size))
  padded = jnp.pad(x, ((0, 0), (radius, radius), (0, 0)), mode="reflect")
  return sum(weights[j] * padded[:, j:j + width] for j in range(size))


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)
_FACTOR_KEYS = ("brightness", "contrast", "saturation", "hue")


def color_augment_image(image: jax.Array, params: Params,
                        cfg: ml_collections.ConfigDict) -> jax.Array:
  """Jitter, grayscale, blur of one float [H, W, 3] image in [0, 1].

  Same order rule as the host: grayscale before blur unless
  ``cfg.blur_before_grayscale`` (SiMo).
  """
  kernel_size = blur_kernel_size(image.shape[0],
                                         cfg.blur_kernel_fraction)
  branches = [
      (lambda x, op=op, key=key: op(x, params[key]))
      for op, key in zip(_JITTER_OPS, _FACTOR_KEYS)]
  jittered = image
  for position in range(NUM_JITTER_OPS):
    jittered = jax.lax.switch(params["order"][position], branches, jittered)
  x = jnp.where(params["jitter"], jittered, image)

  def gray(x: jax.Array) -> jax.Array:
    return jnp.where(params["grayscale"], _grayscale(x), x)

  def blur(x: jax.Array) -> jax.Array:
    return jnp.where(params["blur"], _blur(x, params["sigma"], kernel_size), x)

  return gray(blur(x)) if cfg.blur_before_grayscale else blur(gray(x))


def color_augment(key: jax.Array, images: jax.Array,
                  cfg: ml_collections.ConfigDict) -> jax.Array:
  """Colour-augments uint8 (or float on [0, 255]) [B, H, W, 3].

  Returns float32 [B, H, W, 3] on [0, 1]; one independent draw per example.
  """
  x = images.astype(jnp.float32) / 255.0
  keys = jax.random.split(key, x.shape[0])
  params = jax.vmap(lambda k: sample_color_params(k, cfg))(keys)
  return jax.vmap(lambda im, p: color_augment_image(im, p, cfg))(x, params)


def prepare_views(rng: jax.Array, batch: dict[str, jax.Array],
                  augment_config: ml_collections.ConfigDict,
                  mean: Sequence[float], std: Sequence[float]
                  ) -> tuple[jax.Array, jax.Array]:
  """The two views as normalised float32 [B, H, W, 3], ready for the model.

  With ``augment_config.on_device`` the colour stage runs here (keyed on
  ``rng``; independent draws for the two views); otherwise the host already
  did it and this only normalises.
  """
  if not augment_config.on_device:
    return (normalize(batch["view1"], mean, std),
            normalize(batch["view2"], mean, std))
  key1, key2 = jax.random.split(rng)
  return (_standardize(color_augment(key1, batch["view1"], augment_config),
                       mean, std),
          _standardize(color_augment(key2, batch["view2"], augment_config),
                       mean, std))
