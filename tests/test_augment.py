"""RandAugment and random erasing (rils_jax/data/augment.py) against timm's implementation
(timm.data.auto_augment, timm.data.random_erasing), which MAE and BEiT fine-tune with: the same
pixels for every op at a fixed magnitude and sign, the same config parsing, the same erasing
boxes from the same random draws."""

import random

import numpy as np
import pytest
from PIL import Image

from rils_jax.data import augment

auto_augment = pytest.importorskip(
    'timm.data.auto_augment', reason='timm (tests/requirements.txt) is the reference')
random_erasing = pytest.importorskip('timm.data.random_erasing', reason='timm is the reference')
torch = pytest.importorskip('torch', reason='timm needs torch')

FILL = (124, 116, 104)  # round(255 * ImageNet mean), what timm's create_transform passes.


def _image(height=40, width=48, seed=0) -> Image.Image:
  """A non-square picture with smooth gradients, edges and noise (every op changes it)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:height, :width]
  pixels = np.stack([x * 255 / width, y * 255 / height, (x + y) % 64 * 3], -1)
  pixels[10:25, 12:30] = (230, 40, 60)
  pixels += rng.normal(0, 12, pixels.shape)
  return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _timm_op(img, name, magnitude, negate, monkeypatch):
  """timm's AugmentOp body at a fixed magnitude, its sign draw forced to `negate`."""
  monkeypatch.setattr(auto_augment.random, 'random', lambda: 0.9 if negate else 0.1)
  level_fn = auto_augment.LEVEL_TO_ARG[name]
  args = level_fn(magnitude, dict(auto_augment._HPARAMS_DEFAULT)) if level_fn else ()
  return auto_augment.NAME_TO_OP[name](img, *args, fillcolor=FILL, resample=Image.BICUBIC)


@pytest.mark.parametrize('name', sorted(set(augment.OPS) | set(augment.INCREASING_OPS)))
def test_each_op_gives_timms_pixels(name, monkeypatch):
  img = _image()
  changed = False
  for magnitude in (9.0, 4.3):
    for negate in (False, True):
      ours = np.asarray(augment.apply_op(img, name, magnitude, negate, fill=FILL))
      theirs = np.asarray(_timm_op(img, name, magnitude, negate, monkeypatch))
      np.testing.assert_array_equal(ours, theirs, err_msg=f'{name} m={magnitude} -={negate}')
      changed |= not np.array_equal(ours, np.asarray(img))
  assert changed, f'{name} left the picture as it was'


def test_posterize_to_zero_bits_is_black():
  # MAE's Pillow computed level & ~255 = 0; a current Pillow refuses 0 bits (timm raises).
  for name, magnitude in (('PosterizeIncreasing', 10.0), ('Posterize', 2.0)):
    out = np.asarray(augment.apply_op(_image(), name, magnitude))
    assert out.shape == (40, 48, 3) and not out.any(), name


def test_mae_spec_parses_as_timm():
  ours = augment.parse('rand-m9-mstd0.5-inc1')
  theirs = auto_augment.rand_augment_transform('rand-m9-mstd0.5-inc1',
                                               dict(translate_const=100, img_mean=FILL))
  assert ours.ops == tuple(op.name for op in theirs.ops) == augment.INCREASING_OPS
  assert ours.num_ops == theirs.num_layers == 2
  assert {op.magnitude for op in theirs.ops} == {ours.magnitude} == {9}
  assert {op.prob for op in theirs.ops} == {ours.prob} == {0.5}
  assert {op.magnitude_std for op in theirs.ops} == {ours.magnitude_std} == {0.5}
  assert ours.fill == FILL
  plain = augment.parse('rand-m7-n3-mstd101-p0.8')
  assert (plain.ops, plain.num_ops, plain.magnitude, plain.prob) == (augment.OPS, 3, 7, 0.8)
  assert plain.magnitude_std == float('inf')  # timm: > 100 means uniform in [0, m].
  for bad in ('m9-inc1', 'rand-m9-x3', 'rand-p1.5'):
    with pytest.raises(ValueError, match='RandAugment spec'):
      augment.parse(bad)


def test_rand_augment_composes_its_ops():
  img, rng = _image(), np.random.default_rng(0)
  inverted = np.asarray(augment.apply_op(img, 'Invert', 0))
  np.testing.assert_array_equal(np.asarray(augment.RandAugment(('Invert',), 1, prob=1.0)(img, rng)),
                                inverted)
  # Two inversions undo each other; probability 0 never applies an op.
  np.testing.assert_array_equal(
      np.asarray(augment.RandAugment(('Invert',), 2, prob=1.0)(img, rng)), np.asarray(img))
  np.testing.assert_array_equal(
      np.asarray(augment.RandAugment(augment.OPS, 2, prob=0.0)(img, rng)), np.asarray(img))
  # At p = 0.5 and 2 ops, a quarter of the images are left unchanged: 1 - 0.75 (up to ops that
  # are identities on this picture, which there are none of at magnitude 9 +- 0.5 here).
  ra = augment.parse('rand-m9-mstd0.5-inc1')
  same = np.mean([np.array_equal(np.asarray(ra(img, rng)), np.asarray(img)) for _ in range(400)])
  assert 0.19 < same < 0.31, same


class _PythonRandom:
  """numpy-Generator names over Python's `random` module, which timm's RandomErasing draws
  from: `integers(low, high)` is randint(low, high - 1)."""
  random = staticmethod(lambda: random.random())
  uniform = staticmethod(lambda a, b: random.uniform(a, b))
  integers = staticmethod(lambda low, high: random.randint(low, high - 1))


def test_erasing_boxes_are_timms():
  timm_erase = random_erasing.RandomErasing(probability=0.25, mode='const', device='cpu')
  erased = 0
  for seed in range(60):
    height, width = (40, 48) if seed % 2 else (16, 16)
    random.seed(seed)
    image = torch.ones(3, height, width)
    timm_erase(image)
    random.seed(seed)
    top, bottom, left, right = augment.erasing_box(_PythonRandom(), height, width, 0.25)
    expected = np.ones((height, width), bool)
    expected[top:bottom, left:right] = False
    np.testing.assert_array_equal(image[0].numpy() == 1, expected, err_msg=f'seed {seed}')
    erased += bottom > top
  assert 5 < erased < 30  # About a quarter of 60.
