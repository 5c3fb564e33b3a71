"""Image transforms: decoding, RandomResizedCrop, resize + centre crop, normalisation.

Host-side transforms work on Pillow images and return uint8 (H, W, 3) arrays; the uint8 batch is
sent to the devices and `normalize` runs inside the jitted step (4x less host->device traffic
than float32).

An image is a file path, the encoded bytes (WebDataset, ArrayRecord) or a decoded uint8 array
(TFDS). JPEGs are decoded at a reduced size (Pillow `draft`: libjpeg's DCT scaling by 1/2, 1/4
or 1/8) when the region that will be resized still has at least the output's pixels after the
reduction, so that the result stays a downscale; see `decode_crop`.
"""

import io
import math
import threading
import warnings
from typing import Callable, Optional, Sequence, Tuple, Union

import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image, ImageOps

# Pillow refuses images above this many pixels (decompression bombs) with an error we count.
Image.MAX_IMAGE_PIXELS = 64_000_000


class BadImageError(ValueError):
  """An image that cannot be used: missing, unreadable, undecodable or degenerate."""


class SkipWarnings:
  """Logs the first `limit` distinct reasons for skipping an example in this process, one line
  each, then once that later ones are only counted. A folder of missing images would otherwise
  print a line for every example, and again at every epoch; the counts
  (`data/skipped_examples`) stay exact. Safe to call from grain's read threads; a copy sent to a
  worker process starts its own count.

  Call it with what was skipped and why (the reason names the file); returns nothing.
  """

  def __init__(self, limit: int = 10):
    self.limit = limit
    self._seen = set()
    self._lock = threading.Lock()

  def __getstate__(self):
    return {'limit': self.limit, '_seen': set()}

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock())

  def __call__(self, what: str, reason) -> None:
    reason = str(reason)
    with self._lock:
      if reason in self._seen or len(self._seen) > self.limit:
        return
      self._seen.add(reason)
      last = len(self._seen) > self.limit
    if last:
      logging.warning('More unreadable files than the %d named above: further ones are '
                      'counted in the metrics (data/skipped_examples), without a line each',
                      self.limit)
    else:
      logging.warning('Skipping %s: %s', what, reason)


ImageSource = Union[str, bytes, np.ndarray]
# EXIF orientations that swap width and height (transpose, 90 and 270 degree rotations).
_SWAPS_AXES = (5, 6, 7, 8)


def _open(source: ImageSource) -> Image.Image:
  if isinstance(source, np.ndarray):
    arr = source[..., 0] if source.ndim == 3 and source.shape[-1] == 1 else source
    return Image.fromarray(np.ascontiguousarray(arr))
  if isinstance(source, (bytes, bytearray, memoryview)):
    return Image.open(io.BytesIO(source))
  return Image.open(source)


def _decode(source: ImageSource,
            region: Optional[Callable[[int, int], Tuple[int, int]]] = None
            ) -> Tuple[Image.Image, float]:
  """Decodes to upright 8-bit RGB (alpha composited on white); Pillow errors propagate.

  `region(width, height)` gets the upright size before decoding and returns the smallest
  (width, height) the decoded image may have; JPEGs are then decoded at the coarsest DCT scale
  that keeps that size. Returns the image and its scale relative to the full-size image.
  """
  with _open(source) as img:
    scale = 1.0
    if region is not None and img.format == 'JPEG':
      full = img.size
      swap = img.getexif().get(0x0112) in _SWAPS_AXES
      need_w, need_h = region(*(full[::-1] if swap else full))
      if swap:
        need_w, need_h = need_h, need_w
      img.draft('RGB', (max(1, need_w), max(1, need_h)))
      # libjpeg's output is ceil(full / r): the content is scaled by exactly 1 / r.
      r = next((r for r in (1, 2, 4, 8) if img.size == (-(-full[0] // r), -(-full[1] // r))), 1)
      scale = 1.0 / r
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
    return img, scale


def _load(source: ImageSource, name: str, region=None) -> Tuple[Image.Image, float]:
  try:
    with warnings.catch_warnings():
      # Pillow only warns between MAX_IMAGE_PIXELS and twice that; refuse those too.
      warnings.simplefilter('error', Image.DecompressionBombWarning)
      img, scale = _decode(source, region)
  except Exception as e:  # pylint: disable=broad-except
    # Pillow's decoders raise many types for malformed files (OSError, SyntaxError, struct.error,
    # IndexError, ZeroDivisionError, DecompressionBombError, ...); one bad file among millions
    # must be skipped and counted, not end the run.
    raise BadImageError(f'{name or _describe(source)}: {type(e).__name__}: {e}') from e
  if min(img.size) < 1:
    raise BadImageError(f'{name or _describe(source)}: empty image {img.size}')
  return img, scale


def _describe(source: ImageSource) -> str:
  if isinstance(source, str):
    return source
  if isinstance(source, np.ndarray):
    return f'array {source.shape} {source.dtype}'
  if isinstance(source, (bytes, bytearray, memoryview)):
    return f'{len(source)} bytes'
  return f'a {type(source).__name__}'


def load_image(source: ImageSource, name: str = '') -> Image.Image:
  """Opens and fully decodes an image as 8-bit RGB, applying its EXIF orientation.

  Args:
    source: a file path, encoded bytes, or a uint8 array (H, W), (H, W, 1), (H, W, 3|4).
    name: how error messages name the image (default: the path, or the byte count).

  Raises:
    BadImageError: when the file is missing or unreadable, cannot be decoded, is a
      decompression bomb, or has a zero-sized side.
  """
  return _load(source, name)[0]


def _reduction(crop_w: float, crop_h: float, size: int) -> float:
  """The coarsest JPEG DCT scale 1/r (r in 1, 2, 4, 8) that leaves a crop at least `size`
  pixels on both sides."""
  r = 8
  while r > 1 and min(crop_w, crop_h) / r < size:
    r //= 2
  return r


def decode_crop(source: ImageSource, size: int, rng: Optional[np.random.Generator] = None,
                scale: Sequence[float] = (0.5, 1.0), name: str = '', draft: bool = True
                ) -> np.ndarray:
  """Decodes an image and returns a `size` x `size` uint8 (size, size, 3) crop: a
  RandomResizedCrop with `rng`, else the resize + centre crop of evaluation.

  With `draft`, a JPEG is decoded at 1/2, 1/4 or 1/8 scale when the crop box, so reduced, still
  has at least `size` pixels on each side (libjpeg scales in the DCT domain, an area average);
  the box is sampled from the full size first, so the random draws are those of the full
  decode and the crop covers the same part of the picture. The result differs from the full
  decode by about one grey level on average (tests/test_data.py measures it).

  Raises:
    BadImageError: as `load_image`.
  """
  box = None

  def region(width, height):
    nonlocal box
    if rng is not None:
      box = random_resized_crop_box(width, height, rng, scale)
      r = _reduction(box[2] - box[0], box[3] - box[1], size) if draft else 1
    else:
      r = _reduction(width, height, size) if draft else 1
    return math.ceil(width / r), math.ceil(height / r)

  img, factor = _load(source, name, region)
  if rng is None:
    return resize_center_crop(img, size)
  if box is None:  # Not a JPEG: the box is drawn on the decoded size.
    region(img.width, img.height)
  box = tuple(v * factor for v in box)
  return np.asarray(img.resize((size, size), Image.BICUBIC, box=box), np.uint8)


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


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
  """Resizes (bicubic) so that the shorter side is `size` pixels, keeping the aspect ratio."""
  scale = size / min(img.width, img.height)
  return img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                    Image.BICUBIC)


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
  """Resizes the shorter side to `size` (bicubic), then takes the central `size` x `size` crop.

  Returns uint8 (size, size, 3).
  """
  img = resize_shorter_side(img, size)
  left, top = (img.width - size) // 2, (img.height - size) // 2
  return np.asarray(img.crop((left, top, left + size, top + size)), np.uint8)


def normalize(images, input_config):
  """(uint8 (..., 3) - 255 * mean) / (255 * std) in float32 (`config.input.mean` / `.std`)."""
  mean = jnp.asarray(input_config.mean, jnp.float32) * 255.0
  std = jnp.asarray(input_config.std, jnp.float32) * 255.0
  return (jnp.asarray(images, jnp.float32) - mean) / std
