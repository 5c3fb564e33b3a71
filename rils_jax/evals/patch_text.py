r"""Patch-text maps: each patch's probability over a list of phrases, as a PNG overlay.

RILS reconstructs masked patches as distributions over sentence embeddings; the teacher side of
that loss (../shared/docs/RILS_METHOD.md, "Losses") is, for patch i of the full branch,
  q_i = softmax(t_i T^T / tau_t),
with t_i the L2-normalised patch embedding in the joint space (`RILS.encode_patches`), T the
L2-normalised phrase embeddings and tau_t the teacher temperature (0.04, release). Here the
phrases play the role of the batch's captions.

  python -m rils_jax.evals.patch_text --checkpoint=/tmp/rils_real \
      --images=photo1.jpg,photo2.jpg --phrases='a dog,grass,water,a person' --out=maps.png

Each row of the PNG is one image: the centre crop the model saw, the arg-max phrase of every
patch (colours as in the legend), then one heat map per phrase (probability 0 dark to 1 bright,
the same scale for every panel), each titled with its phrase and its largest patch probability.
"""

import math
import os
from typing import List, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from rils_jax import console
from rils_jax.data import transforms
from rils_jax.evals import restore as restore_lib
from rils_jax.models import rils as rils_lib

PANEL = 192  # Display side of each panel, pixels.
TITLE = 30   # Title band under each panel, pixels.
# Anchor colours of the heat map, from probability 0 to 1 (dark violet -> red -> pale yellow).
HEAT = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]],
                np.float32)
MAX_PHRASES = 10  # One distinct colour of PALETTE each.
PALETTE = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40],
                    [148, 103, 189], [140, 86, 75], [227, 119, 194], [127, 127, 127],
                    [188, 189, 34], [23, 190, 207]], np.uint8)


def patch_text_probabilities(model: rils_lib.RILS, params, images: np.ndarray,
                             phrase_embeds: np.ndarray, temperature: float, input_config
                             ) -> np.ndarray:
  """q[b, r, c, p]: probability of phrase p for the patch at grid row r, column c of image b.

  Args:
    model, params: a RILS model and its parameters.
    images: uint8 (B, S, S, 3) at the model's image size.
    phrase_embeds: float32 (P, D) L2-normalised text embeddings.
    temperature: the softmax temperature (the teacher temperature tau_t).
    input_config: `config.input` of the run (mean / std normalisation).

  Returns:
    float32 (B, rows, cols, P); sums to 1 over P.
  """
  patches = model.apply({'params': params}, transforms.normalize(images, input_config),
                        method=rils_lib.RILS.encode_patches)
  probs = jax.nn.softmax(patches @ jnp.asarray(phrase_embeds).T / temperature, axis=-1)
  rows, cols = model.grid_shape()
  return np.asarray(probs).reshape(images.shape[0], rows, cols, -1)


def heat_colours(values: np.ndarray) -> np.ndarray:
  """uint8 (..., 3) colours of values in [0, 1] (clipped), interpolated between `HEAT`."""
  x = np.clip(values, 0.0, 1.0) * (len(HEAT) - 1)
  low = np.minimum(np.floor(x).astype(np.int64), len(HEAT) - 2)
  frac = (x - low)[..., None]
  return (HEAT[low] * (1 - frac) + HEAT[low + 1] * frac).round().astype(np.uint8)


def _font():
  try:
    return ImageFont.load_default(size=13)
  except TypeError:  # Pillow built without FreeType: the fixed bitmap font.
    return ImageFont.load_default()


def _upsample(grid: np.ndarray, size: int, resample) -> np.ndarray:
  return np.asarray(Image.fromarray(grid.astype(np.float32), mode='F').resize(
      (size, size), resample))


def render(images: np.ndarray, probs: np.ndarray, phrases: Sequence[str],
           names: Sequence[str] = ()) -> Image.Image:
  """The PNG layout of the module docstring.

  Args:
    images: uint8 (B, S, S, 3) what the model saw.
    probs: float (B, rows, cols, P) from `patch_text_probabilities`.
    phrases: the P phrases.
    names: a label per image (default 'image b').

  Returns:
    An RGB image of B rows x (2 + P) panels.
  """
  batch, _, _, num = probs.shape
  font = _font()
  columns = 2 + num
  sheet = Image.new('RGB', (columns * PANEL, batch * (PANEL + TITLE) + TITLE), 'white')
  draw = ImageDraw.Draw(sheet)
  for p, phrase in enumerate(phrases):  # Legend of the arg-max colours.
    x = 2 * PANEL + p * PANEL
    draw.rectangle([x + 4, 8, x + 18, 22], fill=tuple(int(v) for v in PALETTE[p]))
    draw.text((x + 24, 8), phrase[:26], fill='black', font=font)
  draw.text((4, 8), 'image', fill='black', font=font)
  draw.text((PANEL + 4, 8), 'arg-max phrase per patch', fill='black', font=font)
  for b in range(batch):
    top = TITLE + b * (PANEL + TITLE)
    photo = np.asarray(Image.fromarray(images[b]).resize((PANEL, PANEL), Image.BICUBIC),
                       np.float32)
    sheet.paste(Image.fromarray(photo.astype(np.uint8)), (0, top))
    best = np.argmax(probs[b], axis=-1)
    labels = _upsample(best, PANEL, Image.NEAREST).astype(np.int64)
    blend = 0.45 * photo + 0.55 * PALETTE[labels]
    sheet.paste(Image.fromarray(blend.round().astype(np.uint8)), (PANEL, top))
    for p, phrase in enumerate(phrases):
      heat = heat_colours(_upsample(probs[b, :, :, p], PANEL, Image.BILINEAR))
      panel = 0.35 * photo + 0.65 * heat
      x = (2 + p) * PANEL
      sheet.paste(Image.fromarray(panel.round().astype(np.uint8)), (x, top))
      draw.text((x + 4, top + PANEL + 6), f'{phrase[:20]}  max {probs[b, :, :, p].max():.2f}',
                fill='black', font=font)
    label = names[b] if b < len(names) else f'image {b}'
    draw.text((4, top + PANEL + 6), label[-30:], fill='black', font=font)
  return sheet


def patch_text_map(checkpoint: str, images: Sequence[str], phrases: Sequence[str], out: str,
                   step=None, temperature: float = 0.0) -> np.ndarray:
  """Renders the maps of `images` (paths) and `phrases` for a checkpoint's model to `out`.

  `temperature` 0 uses the run's `config.loss.teacher_temperature`.

  Returns:
    the probabilities, float32 (len(images), rows, cols, len(phrases)).

  Raises:
    ValueError: for no image or no phrase, an empty phrase, more than `MAX_PHRASES`, a bad
      temperature, or an `out` that is not a .png in an existing folder or is an input.
    transforms.BadImageError: for an image that cannot be read.
    FileNotFoundError: for a missing checkpoint.
  """
  phrases = [p.strip() for p in phrases]
  if not images or not phrases or not all(phrases):
    raise ValueError(f'need at least one image and one non-empty phrase, got {len(images)} '
                     f'images and phrases {phrases}')
  if len(phrases) > MAX_PHRASES:
    raise ValueError(f'at most {MAX_PHRASES} phrases (one colour each in the arg-max panel), '
                     f'got {len(phrases)}')
  if not math.isfinite(temperature) or temperature < 0:
    raise ValueError(f'temperature must be a finite number > 0 (0: the run\'s teacher '
                     f'temperature), got {temperature}')
  if not out.lower().endswith('.png'):
    raise ValueError(f'--out must name a .png file, got {out!r}')
  if any(os.path.abspath(out) == os.path.abspath(p) for p in images):
    raise ValueError(f'--out={out} is one of the input images; choose another file')
  if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
    raise ValueError(f'the folder of --out={out} does not exist')
  restored = restore_lib.restore(checkpoint, step)
  config = restored.config
  pixels = np.stack([transforms.decode_crop(path, config.model.image_size, name=path)
                     for path in images])
  tokens = restored.tokenizer.encode(phrases, config.model.text.context_length)
  embeds = restored.model.apply({'params': restored.params}, tokens,
                                method=rils_lib.RILS.encode_text)
  probs = patch_text_probabilities(restored.model, restored.params, pixels, np.asarray(embeds),
                                   temperature or config.loss.teacher_temperature, config.input)
  names = [os.path.join(os.path.basename(os.path.dirname(p)), os.path.basename(p))
           for p in images]
  render(pixels, probs, phrases, names).save(out)
  return probs


def _define_flags():
  flags.DEFINE_string('checkpoint', None, "A run's workdir or one checkpoint folder.")
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_list('images', None, 'Image files, comma-separated.')
  flags.DEFINE_list('phrases', None, 'Phrases, comma-separated.')
  flags.DEFINE_string('out', None, 'PNG file to write.')
  flags.DEFINE_float('temperature', 0.0, "Softmax temperature; 0: the run's teacher "
                     'temperature.')
  flags.mark_flags_as_required(['checkpoint', 'images', 'phrases', 'out'])


def main(argv: List[str]):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  console.quiet_libraries()
  f = flags.FLAGS
  probs = patch_text_map(f.checkpoint, f.images, f.phrases, f.out, f.step, f.temperature)
  share = np.bincount(probs.argmax(-1).reshape(-1), minlength=len(f.phrases)) / probs[..., 0].size
  print(f'Wrote {f.out}: {probs.shape[0]} images x {len(f.phrases)} phrases on a '
        f'{probs.shape[1]}x{probs.shape[2]} patch grid; share of patches whose most probable '
        'phrase is each: ' + ', '.join(f'{p!r} {s:.2f}' for p, s in zip(f.phrases, share)))


if __name__ == '__main__':
  _define_flags()
  console.run(main)
