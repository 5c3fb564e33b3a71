"""The embedded default dataset: generated pictures of coloured shapes with captions that say
what is drawn.

Every image shows one shape (circle, square, triangle, cross) in one of five colours, of a
random size and position, on a noisy dark or light grey background; each image has three
captions such as "a small red circle in the top left corner" or "a photo of a red circle on a
dark background". The layout is the same as real data:

  <root>/train/captions.csv + train/images/*.png      (CSV `image,caption`, like Flickr8k)
  <root>/heldout/captions.csv + heldout/images/*.png  (held-out captions, for retrieval)
  <root>/zeroshot/<colour>_<shape>/*.png              (image folder, for zero-shot)

so the default run goes through the same readers, tokenizer trainer and pipeline as real data.
Zero-shot classes are the colour x shape pairs (chance = 1 / classes). Pictures up to 64 px are
drawn at 2x `image_size` (PNG) so the training crop has detail to resample; larger ones at
`image_size` (JPEG).

  python -m rils_jax.data.synthetic --out=/tmp/shapes
"""

import csv
import json
import os
import shutil
import tempfile
import time
from typing import Dict, Tuple

import numpy as np
from absl import flags
from absl import logging
from PIL import Image, ImageDraw

from rils_jax import console

COLORS: Dict[str, Tuple[int, int, int]] = {
    'red': (220, 40, 40), 'green': (40, 180, 60), 'blue': (50, 90, 230),
    'yellow': (235, 215, 40), 'purple': (150, 60, 200),
}
SHAPES = ('circle', 'square', 'triangle', 'cross')


def cache_dir() -> str:
  """Where generated data lives: $RILS_JAX_CACHE, else $XDG_CACHE_HOME/rils_jax, else
  ~/.cache/rils_jax."""
  if os.environ.get('RILS_JAX_CACHE'):
    return os.environ['RILS_JAX_CACHE']
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'rils_jax')


def class_names():
  """Zero-shot class names 'colour shape', in the sorted order of their folders."""
  return sorted(f'{c} {s}' for c in COLORS for s in SHAPES)


def draw_example(rng: np.random.Generator, size: int):
  """Draws one picture.

  Returns:
    (PIL RGB image of side `size`, colour, shape, list of 3 captions). Captions name the size,
    colour, shape, quadrant and background shade (320 combinations), so that few captions of a
    batch coincide and in-batch retrieval is well posed.
  """
  color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
  dark = bool(rng.integers(2))
  background = rng.integers(40, 90) if dark else rng.integers(150, 200)
  pixels = background + rng.normal(0, 12, (size, size, 1)).repeat(3, axis=2)
  img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(img)
  radius = rng.uniform(0.16, 0.3) * size
  cx, cy = rng.uniform(radius, size - radius, size=2)
  fill = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in COLORS[color])
  if shape == 'circle':
    draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
  elif shape == 'square':
    r = radius * 0.85
    draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
  elif shape == 'triangle':
    draw.polygon([(cx, cy - radius), (cx - radius, cy + radius * 0.8),
                  (cx + radius, cy + radius * 0.8)], fill=fill)
  else:
    t = radius * 0.35
    draw.rectangle([cx - radius, cy - t, cx + radius, cy + t], fill=fill)
    draw.rectangle([cx - t, cy - radius, cx + t, cy + radius], fill=fill)
  size_word = 'large' if radius > 0.23 * size else 'small'
  where = f'{"top" if cy < size / 2 else "bottom"} {"left" if cx < size / 2 else "right"}'
  shade = 'dark' if dark else 'light'
  captions = [f'a {size_word} {color} {shape} in the {where} corner',
              f'a photo of a {color} {shape} on a {shade} background',
              f'{shade} picture with a {size_word} {color} {shape} at the {where}']
  return img, color, shape, captions


def _extension(size: int) -> str:
  # Noisy backgrounds do not compress: PNG for small pictures, JPEG (~15 KB at 224 px) above.
  return 'png' if size <= 128 else 'jpg'


def _write_caption_split(root: str, split: str, count: int, size: int, rng) -> None:
  image_dir = os.path.join(root, split, 'images')
  os.makedirs(image_dir)
  with open(os.path.join(root, split, 'captions.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['image', 'caption'])
    for i in range(count):
      img, _, _, captions = draw_example(rng, size)
      name = f'{i:06d}.{_extension(size)}'
      img.save(os.path.join(image_dir, name))
      writer.writerows([name, c] for c in captions)


def generate(root: str, *, image_size: int = 32, num_train: int = 4000, num_heldout: int = 200,
             zeroshot_per_class: int = 20, seed: int = 0) -> str:
  """Writes the dataset under `root` unless a complete one is there already.

  The dataset is written to a temporary folder and renamed into place, so an interrupted
  generation never leaves a partial dataset. Deterministic in `seed`.

  Returns:
    `root`.
  """
  spec = dict(version=2, image_size=image_size, num_train=num_train, num_heldout=num_heldout,
              zeroshot_per_class=zeroshot_per_class, seed=seed)
  marker = os.path.join(root, 'dataset.json')
  if os.path.isfile(marker):
    with open(marker) as f:
      if json.load(f) == spec:
        return root
    raise ValueError(f'{root} holds a synthetic dataset with other settings; use another path')
  parent = os.path.dirname(os.path.abspath(root))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.synthetic-', dir=parent)
  start = time.time()
  total = num_train + num_heldout + zeroshot_per_class * len(class_names())
  logging.info('Generating the default dataset (%d pictures, once) in %s', total, root)
  try:
    rng = np.random.default_rng(seed)
    size = 2 * image_size if image_size <= 64 else image_size
    _write_caption_split(tmp, 'train', num_train, size, rng)
    logging.info('  %d / %d pictures in %.0f s', num_train, total, time.time() - start)
    _write_caption_split(tmp, 'heldout', num_heldout, size, rng)
    counts = {name: 0 for name in class_names()}
    i = 0
    while min(counts.values()) < zeroshot_per_class:
      img, color, shape, _ = draw_example(rng, size)
      name = f'{color} {shape}'
      if counts[name] < zeroshot_per_class:
        folder = os.path.join(tmp, 'zeroshot', name.replace(' ', '_'))
        os.makedirs(folder, exist_ok=True)
        img.save(os.path.join(folder, f'{i:05d}.{_extension(size)}'))
        counts[name] += 1
        i += 1
    with open(os.path.join(tmp, 'dataset.json'), 'w') as f:
      json.dump(spec, f)
    logging.info('  %d / %d pictures in %.0f s: done', total, total, time.time() - start)
    try:
      os.rename(tmp, root)
    except OSError:
      if not os.path.isfile(marker):  # Lost a race with another process only if it finished.
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return root


def main(argv):
  del argv
  f = flags.FLAGS
  print(generate(f.out, image_size=f.image_size, num_train=f.num_train, seed=f.seed))


if __name__ == '__main__':
  flags.DEFINE_string('out', None, 'Output folder.', required=True)
  flags.DEFINE_integer('image_size', 32, 'Model input size; pictures are drawn at twice this.')
  flags.DEFINE_integer('num_train', 4000, 'Training images (3 captions each).')
  flags.DEFINE_integer('seed', 0, 'Generator seed.')
  console.run(main)
