"""Device mesh, logical axis names, the shardings of parameters, optimizer state and batches,
and the global batch assembled from each process's rows.

Parallelism (GSPMD, as in big_vision / MaxText): every parameter and the main activations carry
logical axis names (`nn.with_logical_partitioning` in the modules, `constrain` below), and
`config.sharding_rules` maps those names to the mesh axes:

  slice   data parallelism across TPU slices (DCN); batch only.
  data    data parallelism; batch only, parameters replicated.
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3): XLA gathers
          each layer's weights before use and reduce-scatters its gradients.
  tensor  tensor (Megatron) parallelism: attention heads and the MLP hidden layer.

A dimension that a mesh axis does not divide is replicated instead of failing (e.g. 3 heads over
`tensor=2`); `describe` reports the resulting per-device sizes.
"""

import contextlib
import contextvars
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Outer to inner: the innermost axes get the fastest links (ICI / NVLink).
MESH_AXES = ('slice', 'data', 'fsdp', 'tensor')
BATCH_AXES = ('slice', 'data', 'fsdp')

# Logical name -> mesh axes. Parameter names: embed (model width), mlp (MLP hidden), heads,
# kv (head dim), vocab, joint (the joint image-text space), layers (the stacked layers of
# `config.model.scan_layers`: never sharded, each step of the loop needs its whole layer).
# Activation names: batch, length (tokens), act_embed, act_mlp, act_heads.
DEFAULT_RULES = (
    ('batch', BATCH_AXES),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('vocab', None),
    ('joint', None),
    ('layers', None),
    ('length', None),
    ('act_embed', None),
    ('act_mlp', 'tensor'),
    ('act_heads', 'tensor'),
)

Rules = Tuple[Tuple[str, Any], ...]


def make_mesh(config: ml_collections.ConfigDict, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """Mesh with axes `MESH_AXES`, sizes from `config.mesh` (a dict name -> size).

  A missing axis has size 1; one axis may be -1 to take the remaining devices. With `slice` > 1
  the devices are grouped by TPU slice (`mesh_utils.create_hybrid_device_mesh`), so that only the
  slice axis crosses the data-centre network. Axis types are `Auto` (GSPMD propagation).

  Raises:
    ValueError: for an unknown axis name, more than one -1, or sizes that do not multiply to the
      device count.
  """
  devices = jax.devices() if devices is None else list(devices)
  unknown = set(config.mesh.keys()) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'config.mesh has unknown axes {sorted(unknown)}; known: {MESH_AXES}')
  sizes = [int(config.mesh.get(name, 1)) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'at most one mesh axis may be -1, got {dict(config.mesh)}')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'mesh axis sizes must be positive or -1, got {dict(config.mesh)}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'mesh {dict(config.mesh)} does not divide {len(devices)} devices')
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, '
                     f'{len(devices)} are available')
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if sizes[0] > 1 and not hasattr(devices[0], 'slice_index'):
    # No TPU slices (CPU, GPU, or the dry run's virtual devices): consecutive devices form a
    # slice, as the hybrid mesh would lay them out.
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=auto)
  if sizes[0] > 1:
    per_slice = [1, *sizes[1:]]
    device_array = mesh_utils.create_hybrid_device_mesh(
        per_slice, [sizes[0], 1, 1, 1], devices=devices)
    return Mesh(device_array, MESH_AXES, axis_types=auto)
  return jax.make_mesh(sizes, MESH_AXES, axis_types=auto, devices=devices)


def rules_of(config: ml_collections.ConfigDict) -> Rules:
  """`config.sharding_rules` as a tuple of (logical name, mesh axes) pairs.

  Raises:
    ValueError: for an entry that is not a (name, axis / list of axes / None) pair, or that
      names an axis outside `MESH_AXES` (a typo would silently replicate everything).
  """
  rules = []
  for rule in config.sharding_rules:
    if not isinstance(rule, (list, tuple)) or len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f'config.sharding_rules entry {rule!r} must be a (logical name, mesh '
                       'axes) pair, e.g. ("embed", "fsdp")')
    name, axes = rule
    axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    flat = () if axes is None else ((axes,) if isinstance(axes, str) else axes)
    unknown = [a for a in flat if a not in MESH_AXES]
    if unknown:
      raise ValueError(f'config.sharding_rules maps {name!r} to unknown mesh axes {unknown}; '
                       f'mesh axes are {MESH_AXES}')
    rules.append((name, axes))
  return tuple(rules)


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def mesh_spec(names: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
              rules: Rules) -> P:
  """PartitionSpec for an array of `shape` with logical axis `names`.

  Each name maps through `rules`; a dimension is left unsharded when its mesh axes do not divide
  it, or when an earlier dimension already uses one of them.
  """
  spec, used = [], set()
  mapped = nn.logical_to_mesh_axes(tuple(names), rules)
  for axes, size in zip(mapped, shape):
    flat = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    flat = tuple(a for a in flat if a in mesh.shape and mesh.shape[a] > 1)
    if not flat or size % _axis_size(mesh, flat) or used & set(flat):
      spec.append(None)
      continue
    used |= set(flat)
    spec.append(flat[0] if len(flat) == 1 else flat)
  return P(*spec)


def tree_shardings(boxed_tree, mesh: Mesh, rules: Rules):
  """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` (e.g. the abstract
  output of `model.init`); unboxed leaves are replicated. The result matches `nn.unbox(tree)`."""

  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return NamedSharding(mesh, mesh_spec(leaf.names, leaf.value.shape, mesh, rules))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over all data-parallel axes (slice, data, fsdp)."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  """Number of batch shards: the product of the slice, data and fsdp axes."""
  return _axis_size(mesh, BATCH_AXES)


def process_rows(mesh: Mesh, global_batch: int) -> Tuple[int, int]:
  """Rows [start, stop) of the global batch that live on this process's devices.

  Raises:
    ValueError: if they are not one contiguous block (an unusual device order).
  """
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  rows = sorted({(i[0].start or 0, i[0].stop or global_batch) for i in index_map.values()})
  start, stop = rows[0][0], rows[-1][1]
  if sum(b - a for a, b in rows) != stop - start:
    raise ValueError(f'this process holds non-contiguous batch rows {rows}')
  return start, stop


def put_batch(batch: Dict[str, np.ndarray], mesh: Mesh) -> Dict[str, jax.Array]:
  """Assembles the global batch from this process's rows (`make_array_from_process_local_data`).

  `image` and `text` go to the devices, and `skipped` as int32 (zeros when the batch has none,
  e.g. a hand-made one); `example_id` stays on the host.
  """
  sharding = batch_sharding(mesh)
  local = {'image': batch['image'], 'text': batch['text'],
           'skipped': np.asarray(batch.get('skipped', np.zeros(len(batch['image']))), np.int32)}
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


# Activation constraints. The rules are passed explicitly (not through flax's global
# `nn.logical_axis_rules`), because under a global rule context flax 0.12's DenseGeneral applies
# the 4-D names of the qkv kernel to its flat 2-D initialiser output and fails.
_ACTIVATION_SHARDING: contextvars.ContextVar = contextvars.ContextVar('activation_sharding',
                                                                      default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules):
  """Within this context (while tracing a jitted function), `constrain` pins activations."""
  token = _ACTIVATION_SHARDING.set((mesh, rules))
  try:
    yield
  finally:
    _ACTIVATION_SHARDING.reset(token)


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op outside `activation_sharding`."""
  context = _ACTIVATION_SHARDING.get()
  if context is None:
    return x
  mesh, rules = context
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, mesh_spec(names, x.shape, mesh, rules)))


def shard_bytes(x) -> int:
  """Bytes of one device's shard of `x` (an array or a ShapeDtypeStruct with a sharding)."""
  shape = x.sharding.shard_shape(x.shape)
  return int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def describe(tree) -> Dict[str, int]:
  """Global and per-device bytes of a tree of sharded arrays / ShapeDtypeStructs."""
  leaves = jax.tree.leaves(tree)
  return dict(global_bytes=int(sum(x.size * np.dtype(x.dtype).itemsize for x in leaves)),
              per_device_bytes=int(sum(shard_bytes(x) for x in leaves)))
