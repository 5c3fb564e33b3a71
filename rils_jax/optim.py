"""Optimizers: AdamW with linear warm-up + cosine decay and global-norm clipping (optax), and
the same with layer-wise learning-rate decay for fine-tuning.

Weight decay applies to weight matrices only: `kernel`s of dense/conv layers and the two
projections. Biases, LayerNorm parameters, q/v biases, embeddings (token and positional), the
CLS and mask tokens and the logit scale are not decayed (CLIP / SLIP / MAE practice).
"""

import jax
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
  if config.total_steps < 1:
    raise ValueError(f'config.total_steps={config.total_steps} must be >= 1')
  if o.warmup_steps < 0:
    raise ValueError(f'config.optim.warmup_steps={o.warmup_steps} must be >= 0')
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


def layer_id(path, num_blocks: int) -> int:
  """Layer index of a ViT classifier parameter for layer-wise learning-rate decay (BEiT, Bao et
  al. 2022, Sec. 2.5; MAE's `param_groups_lrd`): the patch embedding and CLS token are layer 0,
  `blocks_i` is layer i + 1, everything after the blocks (final LayerNorm, head) is layer
  num_blocks + 1. `path`: the parameter's key path, e.g. ('visual', 'blocks_3', 'attn', ...)."""
  names = [str(getattr(k, 'key', k)) for k in path]
  for name in names:
    if name in ('patch_embed', 'cls_token', 'pos_embed'):
      return 0
    if name.startswith('blocks_'):
      return int(name.split('_')[1]) + 1
  return num_blocks + 1


def layerwise_lr_scales(params, layer_decay: float, num_blocks: int):
  """Tree like `params` of learning-rate multipliers layer_decay ** (num_blocks + 1 - layer_id):
  1 for the head, layer_decay ** (num_blocks + 1) for the patch embedding (BEiT / MAE)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: float(layer_decay ** (num_blocks + 1 - layer_id(path, num_blocks))), params)


def scale_by_tree(scales) -> optax.GradientTransformation:
  """Multiplies each update leaf by the matching leaf of `scales` (a per-parameter learning
  rate multiplier when applied after AdamW, whose update already holds lr and weight decay)."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s, updates, scales), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_finetune_optimizer(config: ml_collections.ConfigDict, params, num_blocks: int
                            ) -> optax.GradientTransformation:
  """AdamW with warm-up + cosine decay and layer-wise learning-rate decay (MAE / BEiT
  fine-tuning recipe): each parameter's update is multiplied by its `layerwise_lr_scales`
  factor, which scales its learning rate and its weight decay alike (as PyTorch's per-group lr
  does). Reads `config.total_steps` and `config.optim` (lr, warmup_steps, min_lr_ratio, b1, b2,
  eps, weight_decay, grad_clip, layer_decay)."""
  o = config.optim
  transforms = []
  if o.grad_clip:
    transforms.append(optax.clip_by_global_norm(o.grad_clip))
  transforms.append(optax.adamw(learning_rate_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps,
                                weight_decay=o.weight_decay, mask=weight_decay_mask))
  transforms.append(scale_by_tree(layerwise_lr_scales(params, o.layer_decay, num_blocks)))
  return optax.chain(*transforms)
