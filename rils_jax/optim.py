"""Optimizer: AdamW with linear warm-up + cosine decay and global-norm clipping (optax).

Weight decay applies to weight matrices only: `kernel`s of dense/conv layers and the two
projections. Biases, LayerNorm parameters, q/v biases, embeddings (token and positional), the
CLS and mask tokens and the logit scale are not decayed (CLIP / SLIP / MAE practice).
"""

import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

DECAYED_NAMES = ('kernel', 'image_projection', 'text_projection')


def weight_decay_mask(params):
  """Pytree of bools, True for leaves whose last path element is in `DECAYED_NAMES`."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: k[-1] in DECAYED_NAMES for k in flat})


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up from 0 to `config.optim.lr` over `warmup_steps`, then cosine decay to
  `lr * min_lr_ratio` at `config.total_steps` (SLIP recipe: cosine with warm-up).

  Raises:
    ValueError: if `total_steps` is not positive or `warmup_steps` is negative.
  """
  o = config.optim
  if config.total_steps < 1 or o.warmup_steps < 0:
    raise ValueError(f'total_steps={config.total_steps} must be >= 1 and '
                     f'warmup_steps={o.warmup_steps} >= 0')
  warmup = min(o.warmup_steps, config.total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.lr, warmup_steps=warmup,
      decay_steps=max(config.total_steps, warmup + 1), end_value=o.lr * o.min_lr_ratio)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """clip_by_global_norm(config.optim.grad_clip) followed by masked AdamW.

  The first moment is kept in `config.optim.mu_dtype` ('float32' or 'bfloat16', which halves
  its memory); the second moment and the parameters stay float32.

  Raises:
    ValueError: for another `mu_dtype`.
  """
  o = config.optim
  if o.mu_dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"config.optim.mu_dtype must be 'float32' or 'bfloat16', got {o.mu_dtype!r}")
  transforms = []
  if o.grad_clip:
    transforms.append(optax.clip_by_global_norm(o.grad_clip))
  transforms.append(optax.adamw(learning_rate_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps,
                                weight_decay=o.weight_decay, mask=weight_decay_mask,
                                mu_dtype=jnp.dtype(o.mu_dtype)))
  return optax.chain(*transforms)
