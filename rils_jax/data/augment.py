"""RandAugment (Cubuk et al. 2020) with timm's conventions, on Pillow images, without timm.

MAE and BEiT fine-tune with timm's `rand_augment_transform('rand-m9-mstd0.5-inc1')` (MAE
main_finetune.py `--aa`, via `timm.data.create_transform`): for every image, 2 ops drawn
uniformly with replacement from the 'increasing' set, each applied with probability 0.5 at a
magnitude drawn from N(9, 0.5) and clipped to [0, 10]. This module reproduces
timm.data.auto_augment (0.3.2, MAE's pinned version, to 1.0): the op set, the magnitude -> op
argument maps (`LEVEL_TO_ARG`) and the ops themselves, which are Pillow's own (ImageOps,
ImageEnhance, Image.transform / rotate, a point table for SolarizeAdd); tests/test_augment.py
checks each op's pixels against timm's.

`erasing_box` draws the box of timm's `RandomErasing` (MAE: probability 0.25, mode 'pixel',
one box); the jitted step fills it with N(0, 1) noise after normalisation, as timm does.

Conventions as `create_transform(..., interpolation='bicubic', mean=IMAGENET_MEAN)` sets them:
geometric ops resample bicubically and fill with the mean colour round(255 * mean). Random
draws come from the numpy Generator that grain gives each element, so an image's augmentation
depends only on the seed and its position in the stream (a resumed run repeats it). timm uses
Python's `random` and numpy's global state instead: same distributions, other draws.
"""

import dataclasses
import math
import re
from typing import Callable, Dict, Sequence, Tuple

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

LEVEL_DENOM = 10.0  # timm's `_LEVEL_DENOM`: magnitude M means op strength M / 10.

# timm's `_RAND_TRANSFORMS` ('inc0') and `_RAND_INCREASING_TRANSFORMS` ('inc1'); Cutout is left
# to random erasing, as in timm.
OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd',
       'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel',
       'TranslateYRel')
INCREASING_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
                  'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing',
                  'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY',
                  'TranslateXRel', 'TranslateYRel')


# --- The ops (timm.data.auto_augment's, Pillow calls only). `fill` is an RGB tuple. ---

def _affine(img: Image.Image, matrix, fill) -> Image.Image:
  return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BICUBIC, fillcolor=fill)


def shear_x(img, factor: float, fill):
  return _affine(img, (1, factor, 0, 0, 1, 0), fill)


def shear_y(img, factor: float, fill):
  return _affine(img, (1, 0, 0, factor, 1, 0), fill)


def translate_x_rel(img, fraction: float, fill):
  return _affine(img, (1, 0, fraction * img.size[0], 0, 1, 0), fill)


def translate_y_rel(img, fraction: float, fill):
  return _affine(img, (1, 0, 0, 0, 1, fraction * img.size[1]), fill)


def rotate(img, degrees: float, fill):
  return img.rotate(degrees, resample=Image.BICUBIC, fillcolor=fill)


def posterize(img, bits: int, fill):
  """Keeps the `bits` high bits of each level. 0 bits (PosterizeIncreasing at magnitude 10,
  Posterize below 2.5) gives black, as the Pillow of MAE's time computed it (level & ~255);
  current Pillow (13 here) refuses 0 bits, so timm itself raises there with it."""
  del fill
  if bits >= 8:
    return img
  if bits <= 0:
    return img.point([0] * 256 * len(img.getbands()))
  return ImageOps.posterize(img, bits)


def solarize(img, threshold: int, fill):
  del fill
  return ImageOps.solarize(img, threshold)


def solarize_add(img, add: int, fill, threshold: int = 128):
  """Adds `add` (saturating at 255) to the levels below `threshold` (timm's `solarize_add`)."""
  del fill
  table = [min(255, i + add) if i < threshold else i for i in range(256)]
  return img.point(table * len(img.getbands()))


def _enhance(enhancer) -> Callable:
  return lambda img, factor, fill: enhancer(img).enhance(factor)


def _no_arg(op) -> Callable:
  return lambda img, fill: op(img)


APPLY = {
    'AutoContrast': _no_arg(ImageOps.autocontrast),
    'Equalize': _no_arg(ImageOps.equalize),
    'Invert': _no_arg(ImageOps.invert),
    'Rotate': rotate,
    'Posterize': posterize, 'PosterizeIncreasing': posterize,
    'Solarize': solarize, 'SolarizeIncreasing': solarize,
    'SolarizeAdd': solarize_add,
    'Color': _enhance(ImageEnhance.Color), 'ColorIncreasing': _enhance(ImageEnhance.Color),
    'Contrast': _enhance(ImageEnhance.Contrast),
    'ContrastIncreasing': _enhance(ImageEnhance.Contrast),
    'Brightness': _enhance(ImageEnhance.Brightness),
    'BrightnessIncreasing': _enhance(ImageEnhance.Brightness),
    'Sharpness': _enhance(ImageEnhance.Sharpness),
    'SharpnessIncreasing': _enhance(ImageEnhance.Sharpness),
    'ShearX': shear_x, 'ShearY': shear_y,
    'TranslateXRel': translate_x_rel, 'TranslateYRel': translate_y_rel,
}


# --- Magnitude -> argument (timm's `LEVEL_TO_ARG`). `negate` is the sign draw of timm's
# `_randomly_negate`; ops without a sign ignore it. ---

def _signed(scale: float) -> Callable:
  return lambda level, negate: (-1.0 if negate else 1.0) * level / LEVEL_DENOM * scale


def _enhance_increasing(level, negate):
  # 1.0 is "no change"; strength moves it towards 0.1 or 1.9.
  return max(0.1, 1.0 + (-1.0 if negate else 1.0) * level / LEVEL_DENOM * 0.9)


LEVEL_TO_ARG: Dict[str, Callable] = {
    'Rotate': _signed(30.0),                                   # [-30, 30] degrees.
    'Posterize': lambda level, _: int(level / LEVEL_DENOM * 4),  # Keep 0..4 bits (TF TPU).
    'PosterizeIncreasing': lambda level, _: 4 - int(level / LEVEL_DENOM * 4),  # 4..0 bits.
    'Solarize': lambda level, _: min(256, int(level / LEVEL_DENOM * 256)),
    'SolarizeIncreasing': lambda level, _: 256 - min(256, int(level / LEVEL_DENOM * 256)),
    'SolarizeAdd': lambda level, _: min(128, int(level / LEVEL_DENOM * 110)),
    'Color': lambda level, _: level / LEVEL_DENOM * 1.8 + 0.1,  # [0.1, 1.9].
    'ColorIncreasing': _enhance_increasing,
    'ShearX': _signed(0.3), 'ShearY': _signed(0.3),            # [-0.3, 0.3].
    'TranslateXRel': _signed(0.45), 'TranslateYRel': _signed(0.45),  # timm's translate_pct.
}
for _name in ('Contrast', 'Brightness', 'Sharpness'):
  LEVEL_TO_ARG[_name] = LEVEL_TO_ARG['Color']
  LEVEL_TO_ARG[_name + 'Increasing'] = _enhance_increasing


def apply_op(img: Image.Image, name: str, magnitude: float, negate: bool = False,
             fill: Tuple[int, int, int] = (128, 128, 128)) -> Image.Image:
  """One op at a fixed magnitude in [0, 10] (timm's `AugmentOp` with prob 1, mstd 0).

  Args:
    img: an RGB Pillow image.
    name: a name of `OPS` or `INCREASING_OPS`.
    magnitude: op strength on timm's 0-10 scale.
    negate: the sign of signed ops (rotate, shear, translate, the 'Increasing' enhancements).
    fill: the RGB colour of areas that geometric ops uncover.

  Raises:
    KeyError: for an unknown op name.
  """
  level_to_arg = LEVEL_TO_ARG.get(name)
  args = () if level_to_arg is None else (level_to_arg(magnitude, negate),)
  return APPLY[name](img, *args, fill=tuple(fill))


@dataclasses.dataclass(frozen=True)
class RandAugment:
  """timm's `RandAugment`: `num_ops` ops per image, drawn uniformly with replacement from
  `ops`, each applied with probability `prob` at magnitude ~ N(magnitude, magnitude_std)
  clipped to [0, magnitude_max] (timm's "mstd" noise, its own addition to the paper's fixed
  magnitude)."""
  ops: Tuple[str, ...] = INCREASING_OPS
  num_ops: int = 2
  magnitude: float = 9.0
  magnitude_std: float = 0.5
  magnitude_max: float = LEVEL_DENOM
  prob: float = 0.5
  fill: Tuple[int, int, int] = (128, 128, 128)

  def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Returns the augmented RGB image (same size); draws from `rng` in timm's order: the ops,
    then per op: apply?, magnitude, sign."""
    for index in rng.integers(0, len(self.ops), size=self.num_ops):
      if self.prob < 1.0 and rng.random() > self.prob:
        continue
      magnitude = self.magnitude
      if self.magnitude_std == float('inf'):
        magnitude = rng.uniform(0.0, magnitude)
      elif self.magnitude_std > 0:
        magnitude = rng.normal(magnitude, self.magnitude_std)
      magnitude = max(0.0, min(magnitude, self.magnitude_max))
      img = apply_op(img, self.ops[index], magnitude, negate=rng.random() > 0.5, fill=self.fill)
    return img


def parse(spec: str, mean: Sequence[float] = (0.485, 0.456, 0.406)) -> RandAugment:
  """A `RandAugment` from timm's config string, e.g. 'rand-m9-mstd0.5-inc1' (MAE / BEiT).

  Sections after 'rand', in any order: m<magnitude> (default 10), n<ops per image> (2),
  mstd<magnitude std> (0; > 100 means uniform in [0, m]), mmax<magnitude bound> (10),
  inc<0|1> (the 'increasing' op set, default 0), p<op probability> (0.5). `mean` (RGB, [0, 1])
  gives the fill colour round(255 * mean), as timm's `create_transform`.

  Raises:
    ValueError: for a string that is not of this form.
  """
  sections = spec.split('-')
  if sections[0] != 'rand':
    raise ValueError(f"RandAugment spec {spec!r} must start with 'rand' (e.g. "
                     "'rand-m9-mstd0.5-inc1', timm's notation)")
  values = dict(magnitude=LEVEL_DENOM, num_ops=2, magnitude_std=0.0, magnitude_max=LEVEL_DENOM,
                prob=0.5)
  names = dict(m='magnitude', n='num_ops', mstd='magnitude_std', mmax='magnitude_max', p='prob')
  increasing = False
  for section in sections[1:]:
    match = re.fullmatch(r'(mstd|mmax|m|n|inc|p)(\d+(?:\.\d*)?)', section)
    if not match:
      raise ValueError(f'RandAugment spec {spec!r}: unknown section {section!r} (known: m, n, '
                       'mstd, mmax, inc, p followed by a number)')
    key, number = match.group(1), float(match.group(2))
    if key == 'inc':
      increasing = bool(number)
    else:
      values[names[key]] = number
  if values['magnitude_std'] > 100:
    values['magnitude_std'] = float('inf')
  if values['num_ops'] != int(values['num_ops']) or not 0 <= values['prob'] <= 1:
    raise ValueError(f'RandAugment spec {spec!r}: n must be an integer and p in [0, 1]')
  return RandAugment(ops=INCREASING_OPS if increasing else OPS, num_ops=int(values['num_ops']),
                     magnitude=values['magnitude'], magnitude_std=values['magnitude_std'],
                     magnitude_max=values['magnitude_max'], prob=values['prob'],
                     fill=tuple(min(255, round(255 * m)) for m in mean))


NO_BOX = (0, 0, 0, 0)


def erasing_box(rng: np.random.Generator, height: int, width: int, prob: float,
                area: Tuple[float, float] = (0.02, 1 / 3), min_aspect: float = 0.3
                ) -> Tuple[int, int, int, int]:
  """The box (top, bottom, left, right) of timm's `RandomErasing` with one box (count 1), or
  `NO_BOX` (empty) when the image is not erased: with probability `prob`, up to 10 tries of an
  area fraction ~ U(area) and a log-uniform aspect ratio in [min_aspect, 1 / min_aspect]; the
  first box that fits strictly inside the image is placed uniformly (Zhong et al. 2020; timm
  defaults, which MAE keeps)."""
  if rng.random() > prob:  # timm's test, equality included.
    return NO_BOX
  for _ in range(10):
    target = rng.uniform(*area) * height * width
    aspect = math.exp(rng.uniform(math.log(min_aspect), math.log(1 / min_aspect)))
    h = int(round(math.sqrt(target * aspect)))
    w = int(round(math.sqrt(target / aspect)))
    if w < width and h < height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, top + h, left, left + w
  return NO_BOX
