"""Prompt templates for zero-shot classification; `{}` is replaced by the class name.

Sources: CLIP (Radford et al. 2021, Sec. 3.1.4 and the official release's "Prompt Engineering
for ImageNet" notebook): the 80 ImageNet templates, the 7-template subset that CLIP's authors
found best on ImageNet, and the 18 CIFAR-10 templates. `short` is this project's default for
small runs.
"""

from typing import Sequence, Tuple, Union

SHORT = ('a photo of a {}.', 'a {}.', 'a picture of a {}.')

CLIP_IMAGENET_7 = (
    'itap of a {}.', 'a bad photo of the {}.', 'a origami {}.', 'a photo of the large {}.',
    'a {} in a video game.', 'art of the {}.', 'a photo of the small {}.')

CLIP_CIFAR_18 = (
    'a photo of a {}.', 'a blurry photo of a {}.', 'a black and white photo of a {}.',
    'a low contrast photo of a {}.', 'a high contrast photo of a {}.', 'a bad photo of a {}.',
    'a good photo of a {}.', 'a photo of a small {}.', 'a photo of a big {}.',
    'a photo of the {}.', 'a blurry photo of the {}.', 'a black and white photo of the {}.',
    'a low contrast photo of the {}.', 'a high contrast photo of the {}.',
    'a bad photo of the {}.', 'a good photo of the {}.', 'a photo of the small {}.',
    'a photo of the big {}.')

CLIP_IMAGENET_80 = (
    'a bad photo of a {}.', 'a photo of many {}.', 'a sculpture of a {}.',
    'a photo of the hard to see {}.', 'a low resolution photo of the {}.',
    'a rendering of a {}.', 'graffiti of a {}.', 'a bad photo of the {}.',
    'a cropped photo of the {}.', 'a tattoo of a {}.', 'the embroidered {}.',
    'a photo of a hard to see {}.', 'a bright photo of a {}.', 'a photo of a clean {}.',
    'a photo of a dirty {}.', 'a dark photo of the {}.', 'a drawing of a {}.',
    'a photo of my {}.', 'the plastic {}.', 'a photo of the cool {}.',
    'a close-up photo of a {}.', 'a black and white photo of the {}.', 'a painting of the {}.',
    'a painting of a {}.', 'a pixelated photo of the {}.', 'a sculpture of the {}.',
    'a bright photo of the {}.', 'a cropped photo of a {}.', 'a plastic {}.',
    'a photo of the dirty {}.', 'a jpeg corrupted photo of a {}.', 'a blurry photo of the {}.',
    'a photo of the {}.', 'a good photo of the {}.', 'a rendering of the {}.',
    'a {} in a video game.', 'a photo of one {}.', 'a doodle of a {}.',
    'a close-up photo of the {}.', 'a photo of a {}.', 'the origami {}.',
    'the {} in a video game.', 'a sketch of a {}.', 'a doodle of the {}.', 'a origami {}.',
    'a low resolution photo of a {}.', 'the toy {}.', 'a rendition of the {}.',
    'a photo of the clean {}.', 'a photo of a large {}.', 'a rendition of a {}.',
    'a photo of a nice {}.', 'a photo of a weird {}.', 'a blurry photo of a {}.',
    'a cartoon {}.', 'art of a {}.', 'a sketch of the {}.', 'a embroidered {}.',
    'a pixelated photo of a {}.', 'itap of the {}.', 'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.', 'a plushie {}.', 'a photo of the nice {}.',
    'a photo of the small {}.', 'a photo of the weird {}.', 'the cartoon {}.',
    'art of the {}.', 'a drawing of the {}.', 'a photo of the large {}.',
    'a black and white photo of a {}.', 'the plushie {}.', 'a dark photo of a {}.',
    'itap of a {}.', 'graffiti of the {}.', 'a toy {}.', 'itap of my {}.',
    'a photo of a cool {}.', 'a photo of a small {}.', 'a tattoo of the {}.')

TEMPLATE_SETS = {'short': SHORT, 'clip_imagenet_7': CLIP_IMAGENET_7,
                 'clip_imagenet_80': CLIP_IMAGENET_80, 'clip_cifar_18': CLIP_CIFAR_18}


def get_templates(spec: Union[str, Sequence[str]]) -> Tuple[str, ...]:
  """A named set of `TEMPLATE_SETS`, or the given templates.

  Raises:
    ValueError: for an unknown name, an empty list, or a template without exactly one `{}`.
  """
  if isinstance(spec, str):
    if spec not in TEMPLATE_SETS:
      raise ValueError(f'unknown template set {spec!r}; known: {sorted(TEMPLATE_SETS)}, or give '
                       'a list of templates with one {} each')
    return TEMPLATE_SETS[spec]
  out = tuple(spec)
  if not out or any(t.count('{}') != 1 for t in out):
    raise ValueError(f'templates must be a non-empty list of strings with one {{}} each, '
                     f'got {out!r}')
  return out
