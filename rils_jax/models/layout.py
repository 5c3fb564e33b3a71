"""The two layouts of a model's transformer layers, and the conversion between them.

Unrolled (`config.model.scan_layers=False`): one parameter subtree per layer, `blocks_0` ...
`blocks_{n-1}` (encoder, text tower, fine-tuning classifier) and `decoder_blocks_i` (decoder).
Stacked (`scan_layers=True`, `vit.scan_blocks`): one subtree `blocks` / `decoder_blocks` whose
leaves hold all n layers on a new leading axis (logical name `vit.LAYERS`).

`stack_layers` and `unstack_layers` convert any pytree that holds such dicts: parameters,
gradients, the optimizer state (AdamW's mu and nu mirror the parameters), a whole train state,
`nn.LogicallyPartitioned` boxes (the axis name is added / removed) and `jax.ShapeDtypeStruct`s
(shape and `NamedSharding` follow), so that checkpoints, warm starts, fine-tuning, evaluation
and export read either layout. The conversion moves values only: round trips are exact.
"""

import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rils_jax.models import vit

# Names of the stacked subtrees; unrolled, layer i of `name` is `{name}_{i}`.
LAYER_NAMES = ('blocks', 'decoder_blocks')
_LAYER_KEY = re.compile(rf'({"|".join(LAYER_NAMES)})_(\d+)')


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def _is_dict(x) -> bool:
  return isinstance(x, dict)


def _map_dicts(fn, tree):
  """`fn` applied to every dict of `tree`, innermost first (through any pytree container)."""

  def visit(node):
    if _is_dict(node):
      return fn({k: _map_dicts(fn, v) for k, v in node.items()})
    return node

  return jax.tree.map(visit, tree, is_leaf=_is_dict)


def _stack(*xs):
  x = xs[0]
  if _is_box(x):
    return x.replace(value=_stack(*(b.value for b in xs)), names=(vit.LAYERS, *x.names))
  if isinstance(x, jax.ShapeDtypeStruct):
    sharding = x.sharding
    if isinstance(sharding, NamedSharding):
      sharding = NamedSharding(sharding.mesh, P(None, *sharding.spec))
    return jax.ShapeDtypeStruct((len(xs), *x.shape), x.dtype, sharding=sharding)
  if all(isinstance(a, (np.ndarray, np.generic, int, float)) for a in xs):
    return np.stack(xs)
  return jnp.stack(xs)


def _layer(x, i: int):
  if _is_box(x):
    if x.names[:1] != (vit.LAYERS,):
      raise ValueError(f'a stacked parameter has logical axes {x.names}, not {vit.LAYERS!r} '
                       'first')
    return x.replace(value=_layer(x.value, i), names=tuple(x.names[1:]))
  if isinstance(x, jax.ShapeDtypeStruct):
    sharding = x.sharding
    if isinstance(sharding, NamedSharding):
      sharding = NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)
  return x[i]


def _num_layers(subtree) -> int:
  sizes = {(x.value if _is_box(x) else x).shape[0]
           for x in jax.tree.leaves(subtree, is_leaf=_is_box)}
  if len(sizes) != 1:
    raise ValueError(f'stacked layers of different counts {sorted(sizes)}')
  return sizes.pop()


def _stack_dict(d):
  out, layers = {}, {}
  for key, value in d.items():
    match = _LAYER_KEY.fullmatch(key) if isinstance(key, str) else None
    if match:
      layers.setdefault(match[1], {})[int(match[2])] = value
    else:
      out[key] = value
  for name, by_index in layers.items():
    if name in out:
      raise ValueError(f'both {name!r} and {name}_<i> in one tree: a mix of the two layouts')
    if sorted(by_index) != list(range(len(by_index))):
      raise ValueError(f'layers {name}_{sorted(by_index)} are not numbered 0 to n-1')
    out[name] = jax.tree.map(_stack, *(by_index[i] for i in range(len(by_index))),
                             is_leaf=_is_box)
  return out


def _unstack_dict(d):
  out = {}
  for key, value in d.items():
    if key in LAYER_NAMES and _is_dict(value):
      for i in range(_num_layers(value)):
        out[f'{key}_{i}'] = jax.tree.map(lambda x, i=i: _layer(x, i), value, is_leaf=_is_box)
    else:
      out[key] = value
  return out


def stack_layers(tree: Any) -> Any:
  """The stacked layout of `tree`: every dict's `blocks_0` ... `blocks_{n-1}` (and
  `decoder_blocks_i`) replaced by `blocks` (`decoder_blocks`) whose leaves are the layers'
  leaves stacked on a new leading axis: (n, *shape), same dtype. NumPy leaves stay NumPy; boxes
  get `vit.LAYERS` as their first axis name; ShapeDtypeStructs with a `NamedSharding` get an
  unsharded leading axis. A tree already stacked is returned as it is.

  Raises:
    ValueError: for layers not numbered 0 to n-1, layers of different structures, or a dict
      that holds both layouts.
  """
  return _map_dicts(_stack_dict, tree)


def unstack_layers(tree: Any) -> Any:
  """The unrolled layout of `tree` (the inverse of `stack_layers`): every dict's `blocks` /
  `decoder_blocks` subtree becomes `blocks_i` / `decoder_blocks_i`, i < the leading size of
  its leaves. A tree already unrolled is returned as it is.

  Raises:
    ValueError: for stacked leaves of different leading sizes, or a box whose first logical
      axis is not `vit.LAYERS`.
  """
  return _map_dicts(_unstack_dict, tree)


def is_stacked(tree: Any) -> Optional[bool]:
  """True if `tree` (any pytree, e.g. a checkpoint's metadata tree) holds stacked layers,
  False if it holds unrolled ones, None if neither."""
  names = [getattr(k, 'key', None) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
           for k in path]
  if any(name in LAYER_NAMES for name in names):
    return True
  if any(isinstance(name, str) and _LAYER_KEY.fullmatch(name) for name in names):
    return False
  return None


def to_layout(tree: Any, stacked: bool) -> Any:
  """`stack_layers(tree)` if `stacked`, else `unstack_layers(tree)`."""
  return stack_layers(tree) if stacked else unstack_layers(tree)
