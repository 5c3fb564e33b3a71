"""Mixup / CutMix (rils_jax/mixup.py) against timm's `Mixup` in mode 'batch' with MAE's
settings: from the same random draws, the same lambda and box, mixed images and soft targets;
and the mixing against a NumPy statement of it."""

import jax
import numpy as np
import pytest

from rils_jax import mixup

timm_mixup = pytest.importorskip('timm.data.mixup', reason='timm (tests/requirements.txt) is '
                                 'the reference')
torch = pytest.importorskip('torch', reason='timm needs torch')


class _LegacyRandom:
  """numpy-Generator names over np.random's global state, which timm's Mixup draws from."""
  random = staticmethod(lambda: np.random.rand())
  beta = staticmethod(lambda a, b: np.random.beta(a, b))
  integers = staticmethod(lambda low, high: np.random.randint(low, high))


def _batch(batch=6, height=12, width=10, classes=5, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, height, width, 3)).astype(np.float32)
  return images, rng.integers(0, classes, size=batch)


def test_mixup_and_cutmix_match_timm():
  images, labels = _batch()
  kinds = set()
  for seed in range(12):
    theirs = timm_mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5,
                              mode='batch', label_smoothing=0.1, num_classes=5)
    np.random.seed(seed)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())  # timm mixes NCHW tensors.
    x, targets = theirs(x, torch.from_numpy(labels))
    np.random.seed(seed)
    params = mixup.draw(_LegacyRandom(), images.shape[1:3])
    kinds.add(params.cutmix)
    arrays = params.as_arrays()
    mixed = jax.jit(mixup.mix_images)(images, **arrays)
    # CutMix is exact; a blend within 1-2 float32 ulps (XLA may fuse the multiply-add).
    np.testing.assert_allclose(np.asarray(mixed), x.numpy().transpose(0, 2, 3, 1), rtol=0,
                               atol=1e-6, err_msg=f'seed {seed}: {params}')
    ours = mixup.mix_targets(labels, 5, arrays['weights'], 0.1)
    np.testing.assert_allclose(np.asarray(ours), targets.numpy(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(ours).sum(1), 1.0, rtol=1e-6)
  assert kinds == {False, True}  # Both mixup and CutMix batches were drawn.


def test_mixing_as_a_numpy_statement():
  images, labels = _batch(batch=4)
  flipped = images[::-1]
  blend = mixup.MixParams(0.3, False, (0, 0, 0, 0)).as_arrays()
  np.testing.assert_allclose(np.asarray(mixup.mix_images(images, **blend)),
                             0.3 * images + 0.7 * flipped, rtol=1e-6)
  cut = mixup.MixParams(1 - 4 * 5 / 120, True, (2, 6, 3, 8)).as_arrays()
  expected = images.copy()
  expected[:, 2:6, 3:8] = flipped[:, 2:6, 3:8]
  np.testing.assert_array_equal(np.asarray(mixup.mix_images(images, **cut)), expected)
  none = mixup.NO_MIX.as_arrays()
  np.testing.assert_array_equal(np.asarray(mixup.mix_images(images, **none)), images)
  targets = np.asarray(mixup.mix_targets(labels, 5, cut['weights'], 0.0))
  one_hot = np.eye(5)[labels]
  np.testing.assert_allclose(targets, (1 - 20 / 120) * one_hot + 20 / 120 * one_hot[::-1],
                             rtol=1e-6)


def test_cutmix_box_and_lambda_correction():
  rng = np.random.default_rng(3)
  for _ in range(200):
    p = mixup.draw(rng, (12, 10), mixup_alpha=0.0, cutmix_alpha=1.0)
    yl, yh, xl, xh = p.box
    assert p.cutmix and 0 <= yl <= yh <= 12 and 0 <= xl <= xh <= 10
    assert p.lam == pytest.approx(1 - (yh - yl) * (xh - xl) / 120)
  assert mixup.draw(rng, (12, 10), prob=0.0) == mixup.NO_MIX
  assert not mixup.draw(rng, (12, 10), cutmix_alpha=0.0).cutmix


def test_bad_settings_are_refused():
  with pytest.raises(ValueError, match='must be even'):
    mixup.check(0.8, 1.0, 1.0, 0.5, batch_size=7)
  mixup.check(0.0, 0.0, 1.0, 0.5, batch_size=7)  # Off: any batch.
  with pytest.raises(ValueError, match='>= 0'):
    mixup.check(-0.1, 1.0, 1.0, 0.5, batch_size=8)
  with pytest.raises(ValueError, match=r'in \[0, 1\]'):
    mixup.check(0.8, 1.0, 1.5, 0.5, batch_size=8)
