"""Optimizers: AdamW with linear warm-up + cosine decay and global-norm clipping (optax), and
the same with layer-wise learning-rate decay for fine-tuning.

Which parameters are weight-decayed (`config.optim.weight_decay_mask`):
- 'slip' (SLIP's `main.py`, the loop the RILS release descends from): every parameter except
  biases, norms and the logit scale, i.e. SLIP's rule "p.ndim >= 2 and no 'bias' / 'ln' / 'bn'
  in the name" applied to the PyTorch shapes: kernels, the two projections, the token and
  positional embeddings of the text tower, the CLS and mask tokens are decayed; q / v biases
  and the text tower's qkv bias (1-D `*_bias` tensors in PyTorch) are not.
- 'kernels': `kernel`s of dense / conv layers and the two projections only (MAE fine-tuning
  practice, which also keeps the CLS token and position embeddings free; used by
  `make_finetune_optimizer`).
"""

from typing import Any, Callable, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

DECAYED_NAMES = ('kernel', 'image_projection', 'text_projection')
MASKS = ('slip', 'kernels')


def weight_decay_mask(params):
  """The 'kernels' rule: pytree of bools, True for leaves whose last path element is in
  `DECAYED_NAMES`."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: k[-1] in DECAYED_NAMES for k in flat})


def slip_weight_decay_mask(params):
  """The 'slip' rule: pytree of bools, False for biases (`bias`, `q_bias`, `v_bias`), LayerNorm
  parameters (`scale`, `bias` of a norm) and the 0-d logit scale, True for everything else."""
  flat = traverse_util.flatten_dict(params)

  def decayed(path, value) -> bool:
    name = path[-1]
    return not (name.endswith('bias') or name == 'scale' or jnp.ndim(value) == 0)

  return traverse_util.unflatten_dict({k: decayed(k, v) for k, v in flat.items()})


def decay_mask_fn(rule: str):
  """The mask function of rule 'slip' or 'kernels' (see the module docstring).

  Raises:
    ValueError: for another rule.
  """
  if rule not in MASKS:
    raise ValueError(f"config.optim.weight_decay_mask must be 'slip' or 'kernels', got {rule!r}")
  return slip_weight_decay_mask if rule == 'slip' else weight_decay_mask


# LiT's locked towers (`config.model.freeze`): the top-level parameters of each.
FROZEN_TOWERS = {
    '': (),
    'image': ('visual', 'decoder', 'image_projection'),
    'text': ('text', 'text_projection'),
}


def frozen_names(freeze: str) -> Tuple[str, ...]:
  """The top-level parameter names that `config.model.freeze` locks (LiT, Zhai et al. 2022).

  Raises:
    ValueError: for another value than '', 'image' or 'text'.
  """
  if freeze not in FROZEN_TOWERS:
    raise ValueError(f"config.model.freeze must be '', 'image' or 'text', got {freeze!r}")
  return FROZEN_TOWERS[freeze]


def stop_frozen(params: Any, freeze: str) -> Any:
  """`params` with the locked towers stop-gradiented: the step's gradient of them is a zero
  constant, so XLA computes no backward pass through them (nor into what only they feed)."""
  names = frozen_names(freeze)
  if not names:
    return params
  return {k: jax.lax.stop_gradient(v) if k in names else v for k, v in params.items()}


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up from `config.optim.lr_start` (default 0) to `lr` over `warmup_steps`, then
  cosine decay to `lr * min_lr_ratio` at `config.total_steps` (SLIP's schedule: warm-up from
  1e-6, cosine down to 1e-5, i.e. lr_start=1e-6, min_lr_ratio=1e-5 / lr).

  Raises:
    ValueError: if `total_steps` or `lr` is not positive, or `warmup_steps` is negative.
  """
  o = config.optim
  if config.total_steps < 1:
    raise ValueError(f'config.total_steps={config.total_steps} must be >= 1')
  if o.warmup_steps < 0:
    raise ValueError(f'config.optim.warmup_steps={o.warmup_steps} must be >= 0')
  if not o.lr > 0:
    raise ValueError(f'config.optim.lr={o.lr} must be > 0')
  warmup = min(o.warmup_steps, config.total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=o.get('lr_start', 0.0), peak_value=o.lr, warmup_steps=warmup,
      decay_steps=max(config.total_steps, warmup + 1), end_value=o.lr * o.min_lr_ratio)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """clip_by_global_norm(config.optim.grad_clip) (none when 0, as SLIP) followed by AdamW
  with weight decay on the parameters of `config.optim.weight_decay_mask` (see above).

  The first moment is kept in `config.optim.mu_dtype` ('float32' or 'bfloat16', which halves
  its memory); the second moment and the parameters stay float32.

  With `config.model.freeze` (LiT) the optimizer sees only the trained parameters
  (`trained_only`): the locked towers get a zero update, no weight decay, and have no moments
  in the optimizer state.

  Raises:
    ValueError: for another `mu_dtype`, `weight_decay_mask` or `model.freeze`.
  """
  optimizer = _adamw(config)
  frozen = frozen_names(config.model.get('freeze', ''))
  return trained_only(optimizer, frozen) if frozen else optimizer


def _adamw(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """`make_optimizer`'s transformation of the trained parameters."""
  o = config.optim
  mask = decay_mask_fn(o.get('weight_decay_mask', 'kernels'))
  if o.mu_dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"config.optim.mu_dtype must be 'float32' or 'bfloat16', got {o.mu_dtype!r}")
  transforms = []
  if o.grad_clip:
    transforms.append(optax.clip_by_global_norm(o.grad_clip))
  transforms.append(optax.adamw(learning_rate_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps,
                                weight_decay=o.weight_decay, mask=mask,
                                mu_dtype=jnp.dtype(o.mu_dtype)))
  return optax.chain(*transforms)


class TrainedOnlyState(NamedTuple):
  """State of `trained_only`: the inner optimizer's state over the trained parameters."""
  inner: Any


def _without(tree, names):
  return {k: v for k, v in tree.items() if k not in names}


def trained_only(inner: optax.GradientTransformation, frozen: Tuple[str, ...]
                 ) -> optax.GradientTransformation:
  """`inner` over the top-level parameters not in `frozen`; the frozen ones get zero updates
  and no state (optax's `multi_transform` with `set_to_zero` would do the same, but its
  masked states do not go through `optax.tree_map_params`, which lays out the state)."""

  def init(params):
    return TrainedOnlyState(inner.init(_without(params, frozen)))

  def update(updates, state, params=None):
    trained, inner_state = inner.update(_without(updates, frozen), state.inner,
                                        None if params is None else _without(params, frozen))
    out = {k: trained[k] if k in trained else jax.tree.map(jnp.zeros_like, v)
           for k, v in updates.items()}
    return out, TrainedOnlyState(inner_state)

  return optax.GradientTransformation(init, update)


def map_state_params(config: ml_collections.ConfigDict, f: Callable, opt_state, like,
                     non_params: Callable):
  """`optax.tree_map_params` for `make_optimizer(config)`'s state: each parameter-shaped subtree
  of `opt_state` (a moment) becomes `f(leaf, like's leaf)`, everything else
  `non_params(leaf)` (e.g. the shardings of the state from the parameters')."""
  frozen = frozen_names(config.model.get('freeze', ''))
  if not frozen:
    return optax.tree_map_params(_adamw(config), f, opt_state, like,
                                 transform_non_params=non_params)
  return TrainedOnlyState(optax.tree_map_params(_adamw(config), f, opt_state.inner,
                                                _without(like, frozen),
                                                transform_non_params=non_params))


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
  1 for the head, layer_decay ** (num_blocks + 1) for the patch embedding (BEiT / MAE).

  A leaf under stacked blocks (`blocks`, `config.scan_layers`, models/layout.py) gets a float32
  array (num_blocks, 1, ...) of the blocks' multipliers, which broadcasts over its layers: the
  same float32 products as the unrolled layout's Python floats."""

  def scale(path, leaf):
    names = [str(getattr(k, 'key', k)) for k in path]
    if 'blocks' in names:
      per_layer = [layer_decay ** (num_blocks - i) for i in range(num_blocks)]
      return np.asarray(per_layer, np.float32).reshape((num_blocks,) + (1,) * (np.ndim(leaf) - 1))
    return float(layer_decay ** (num_blocks + 1 - layer_id(path, num_blocks)))

  return jax.tree_util.tree_map_with_path(scale, params)


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
