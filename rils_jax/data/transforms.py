"""Image transforms: decoding, RandomResizedCrop, resize + centre crop, normalisation.

Host-side transforms work on Pillow images and return uint8 (H, W, 3) arrays; the uint8 batch is
sent to the devices and `normalize` runs inside the jitted step (4x less host->device traffic
than float32).
"""

import math
import warnings
from typing import Sequence, Tuple

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

# Pillow refuses images above this many pixels (decompression bombs) with an error we count.
Image.MAX_IMAGE_PIXELS = 64_000_000


class BadImageError(ValueError):
  """An image that cannot be used: missing, unreadable, undecodable or degenerate."""


def _decode(path: str) -> Image.Image:
  """Decodes to upright 8-bit RGB (alpha composited on white); Pillow errors propagate."""
  with Image.open(path) as img:
    img = ImageOps.exif_transpose(img)
    if img.mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):
      # 16/32-bit integer or float greyscale: scale to 8 bits rather than clipping. Floats in
      # [0, 1] are taken as intensities in [0, 1].
      arr = np.nan_to_num(np.asarray(img, np.float64))
      peak = 1.0 if img.mode == 'F' and arr.max() <= 1.0 else max(arr.max(), 1.0)
      img = Image.fromarray((np.clip(arr, 0, None) / peak * 255.0).astype(np.uint8))
    if img.mode != 'RGB':
      if img.mode in ('RGBA', 'LA', 'PA') or (img.mode == 'P' and 'transparency' in img.info):
        img = img.convert('RGBA')
        background = Image.new('RGBA', img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
      img = img.convert('RGB')
    img.load()
    return img


def load_image(path: str) -> Image.Image:
  """Opens and fully decodes an image as 8-bit RGB, applying its EXIF orientation.

  Raises:
    BadImageError: when the file is missing or unreadable, cannot be decoded, is a
      decompression bomb, or has a zero-sized side.
  """
  try:
    with warnings.catch_warnings():
      # Pillow only warns between MAX_IMAGE_PIXELS and twice that; refuse those too.
      warnings.simplefilter('error', Image.DecompressionBombWarning)
      img = _decode(path)
  except Exception as e:  # pylint: disable=broad-except
    # Pillow's decoders raise many types for malformed files (OSError, SyntaxError, struct.error,
    # IndexError, ZeroDivisionError, DecompressionBombError, ...); one bad file among millions
    # must be skipped and counted, not end the run.
    raise BadImageError(f'{path}: {type(e).__name__}: {e}') from e
  if min(img.size) < 1:
    raise BadImageError(f'{path}: empty image {img.size}')
  return img


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: Sequence[float] = (0.5, 1.0),
                            ratio: Sequence[float] = (3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
  """Crop box (left, top, right, bottom) of RandomResizedCrop (Szegedy et al. 2015; torchvision).

  Samples an area fraction uniformly in `scale` and a log-uniform aspect ratio in `ratio`; after
  10 failed tries falls back to the largest centred crop with the ratio clamped into `ratio`.
  """
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      return left, top, left + w, top + h
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  left, top = (width - w) // 2, (height - h) // 2
  return left, top, left + w, top + h


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator,
                        scale: Sequence[float] = (0.5, 1.0)) -> np.ndarray:
  """RandomResizedCrop to `size` x `size` (bicubic). Returns uint8 (size, size, 3)."""
  box = random_resized_crop_box(img.width, img.height, rng, scale)
  return np.asarray(img.resize((size, size), Image.BICUBIC, box=box), np.uint8)


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
  """Resizes the shorter side to `size` (bicubic), then takes the central `size` x `size` crop.

  Returns uint8 (size, size, 3).
  """
  scale = size / min(img.width, img.height)
  w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
  img = img.resize((w, h), Image.BICUBIC)
  left, top = (w - size) // 2, (h - size) // 2
  return np.asarray(img.crop((left, top, left + size, top + size)), np.uint8)


def normalize(images, input_config):
  """(uint8 (..., 3) - 255 * mean) / (255 * std) in float32 (`config.input.mean` / `.std`)."""
  mean = jnp.asarray(input_config.mean, jnp.float32) * 255.0
  std = jnp.asarray(input_config.std, jnp.float32) * 255.0
  return (jnp.asarray(images, jnp.float32) - mean) / std
