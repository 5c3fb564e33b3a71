"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) per batch, as timm's `Mixup` in
mode 'batch', the MAE / BEiT fine-tuning default (MAE main_finetune.py: mixup 0.8, cutmix 1.0,
prob 1.0, switch_prob 0.5, label_smoothing 0.1).

The host draws one `MixParams` per step (`draw`, NumPy, timm's `_params_per_batch` and
`cutmix_bbox_and_lam` in timm's draw order); the jitted step applies them to the normalised
batch (`mix_images`) and builds the soft targets (`mix_targets`), which the soft-target
cross-entropy sum(-t * log_softmax(logits)) (timm's `SoftTargetCrossEntropy`) then uses.
Every sample is mixed with the sample at the mirrored batch position (`x.flip(0)`), so the
batch must be even. Box convention: the current timm's (1.0 here: `yh = cy + (cut_h + 1) // 2`,
a box of exactly cut_h rows before clipping); timm 0.3.2, which MAE pinned, used
`cy + cut_h // 2`, one row and column fewer for odd sizes.
"""

from typing import NamedTuple, Tuple

import jax.numpy as jnp
import numpy as np


class MixParams(NamedTuple):
  """One batch's mixing: `lam` is the weight of each sample's own image and label (1.0: no
  mixing); for CutMix, rows [yl, yh) x columns [xl, xh) come from the mirrored sample and `lam`
  is corrected to the fraction of the image left (timm's `correct_lam`)."""
  lam: float
  cutmix: bool
  box: Tuple[int, int, int, int]  # (yl, yh, xl, xh); (0, 0, 0, 0) for mixup.

  def as_arrays(self):
    """The jitted step's inputs: float32 (2,) [lam, 1 - lam] (1 - lam taken in float64 and
    rounded once, as PyTorch does for a Python scalar), bool (), int32 (4,)."""
    return dict(weights=np.array([self.lam, 1.0 - self.lam], np.float32),
                cutmix=np.bool_(self.cutmix), box=np.array(self.box, np.int32))


NO_MIX = MixParams(1.0, False, (0, 0, 0, 0))


def check(mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float,
          batch_size: int) -> None:
  """Raises ValueError for negative alphas, probabilities outside [0, 1], or an odd batch
  when mixing is on."""
  if mixup_alpha < 0 or cutmix_alpha < 0:
    raise ValueError(f'mixup alpha {mixup_alpha} and cutmix alpha {cutmix_alpha} must be >= 0 '
                     '(0 turns each off)')
  if not (0 <= prob <= 1 and 0 <= switch_prob <= 1):
    raise ValueError(f'mixup prob {prob} and switch_prob {switch_prob} must be in [0, 1]')
  if (mixup_alpha or cutmix_alpha) and prob and batch_size % 2:
    raise ValueError(f'mixup / cutmix pair each sample with the mirrored one: batch_size='
                     f'{batch_size} must be even')


def draw(rng, image_hw: Tuple[int, int], mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
         prob: float = 1.0, switch_prob: float = 0.5) -> MixParams:
  """One batch's `MixParams` (timm `Mixup._params_per_batch` + `cutmix_bbox_and_lam`).

  Args:
    rng: `random()`, `beta(a, b)` and `integers(low, high)` as numpy's Generator (timm draws
      the same from np.random's rand, beta and randint).
    image_hw: (H, W) of the images.
    mixup_alpha, cutmix_alpha: Beta(alpha, alpha) of lambda; 0 turns that kind off.
    prob: probability that the batch is mixed at all.
    switch_prob: probability of CutMix rather than mixup when both are on.
  """
  if not (mixup_alpha or cutmix_alpha) or not rng.random() < prob:
    return NO_MIX
  if mixup_alpha and cutmix_alpha:
    cutmix = bool(rng.random() < switch_prob)
  else:
    cutmix = bool(cutmix_alpha)
  alpha = cutmix_alpha if cutmix else mixup_alpha
  lam = float(rng.beta(alpha, alpha))
  if not cutmix:
    return MixParams(lam, False, (0, 0, 0, 0))
  # timm's `rand_bbox`: a box of sides sqrt(1 - lam) * (H, W), centred uniformly, clipped.
  h, w = image_hw
  ratio = np.sqrt(1.0 - lam)
  cut_h, cut_w = int(h * ratio), int(w * ratio)
  cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
  yl, yh = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + (cut_h + 1) // 2, 0, h)
  xl, xh = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + (cut_w + 1) // 2, 0, w)
  lam = 1.0 - (yh - yl) * (xh - xl) / float(h * w)  # The area the box really took.
  return MixParams(float(lam), True, (int(yl), int(yh), int(xl), int(xh)))


def mix_images(images: jnp.ndarray, weights: jnp.ndarray, cutmix: jnp.ndarray,
               box: jnp.ndarray) -> jnp.ndarray:
  """Mixes a batch with its mirror image (JAX, jit-friendly: the parameters are arrays).

  Args:
    images: float (B, H, W, C), normalised (timm mixes after normalisation).
    weights, cutmix, box: `MixParams.as_arrays()`.

  Returns:
    float (B, H, W, C): lam * x + (1 - lam) * x[::-1] for mixup; x with the box from x[::-1]
    for CutMix.
  """
  flipped = images[::-1]
  rows = jnp.arange(images.shape[1])[:, None]
  cols = jnp.arange(images.shape[2])[None, :]
  inside = (rows >= box[0]) & (rows < box[1]) & (cols >= box[2]) & (cols < box[3])
  pasted = jnp.where(inside[None, :, :, None], flipped, images)
  blended = images * weights[0].astype(images.dtype) + flipped * weights[1].astype(images.dtype)
  return jnp.where(cutmix, pasted, blended)


def mix_targets(labels: jnp.ndarray, num_classes: int, weights: jnp.ndarray,
                smoothing: float) -> jnp.ndarray:
  """timm's `mixup_target`: label-smoothed one-hot targets (off = s / K, on = 1 - s + s / K)
  mixed like the images.

  Args:
    labels: int (B,).
    num_classes: K.
    weights: float32 (2,) [lam, 1 - lam].
    smoothing: label smoothing s.

  Returns:
    float32 (B, K), rows summing to 1.
  """
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  targets = jnp.where(labels[:, None] == jnp.arange(num_classes)[None, :],
                      jnp.float32(on), jnp.float32(off))
  return targets * weights[0] + targets[::-1] * weights[1]
