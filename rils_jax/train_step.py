"""Train state, device mesh and the jitted, sharded RILS train step.

The step is one `jax.jit` with explicit `in_shardings` / `out_shardings` over a
`jax.sharding.Mesh` built from `config.mesh`: the batch is split over the `data` axis, the state
is replicated (FSDP / tensor sharding is a later layer), and the state buffers are donated.
"""

import math
from typing import Any, Callable, Dict, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rils_jax import losses
from rils_jax import optim
from rils_jax.data import transforms
from rils_jax.models import rils as rils_lib
from rils_jax.models import vit

DATA_AXIS = 'data'


@flax.struct.dataclass
class TrainState:
  """step: int32 scalar; params: float32 pytree; opt_state: optax state pytree."""
  step: jax.Array
  params: Any
  opt_state: Any


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """Mesh whose axes and sizes come from `config.mesh` (a dict name -> size; -1 fills the rest).

  Uses `Auto` axis types: GSPMD propagates shardings from the jit's in/out shardings.

  Raises:
    ValueError: if the sizes do not multiply to the device count, more than one axis is -1, or
      there is no `data` axis.
  """
  devices = jax.devices() if devices is None else list(devices)
  names = tuple(config.mesh.keys())
  sizes = [int(config.mesh[n]) for n in names]
  if DATA_AXIS not in names:
    raise ValueError(f'config.mesh needs a {DATA_AXIS!r} axis, got {dict(config.mesh)}')
  if sizes.count(-1) > 1:
    raise ValueError(f'at most one mesh axis may be -1, got {dict(config.mesh)}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if known <= 0 or len(devices) % known:
      raise ValueError(f'mesh {dict(config.mesh)} does not divide {len(devices)} devices')
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f'mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, '
                     f'{len(devices)} are available')
  return jax.make_mesh(sizes, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names),
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the `data` axis, the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def dummy_batch(config: ml_collections.ConfigDict, batch_size: int) -> Dict[str, np.ndarray]:
  """All-zero batch with the shapes and dtypes of the input pipeline (uint8 images, int32 text).

  Shapes only: the text rows hold no end-of-text token, so the text tower pools position 0.
  """
  size = config.model.image_size
  return dict(image=np.zeros((batch_size, size, size, 3), np.uint8),
              text=np.zeros((batch_size, config.model.text.context_length), np.int32))


def init_params(model: rils_lib.RILS, config: ml_collections.ConfigDict, rng: jax.Array):
  """Initial float32 parameters of `model` (the masked branch included)."""
  batch = dummy_batch(config, 2)
  images = transforms.normalize(batch['image'], config.input)
  masking = vit.random_masking(jax.random.PRNGKey(0), 2, math.prod(model.grid_shape()),
                               config.model.mask_ratio)
  return model.init(rng, images, batch['text'], masking)['params']


def create_train_state(model: rils_lib.RILS, optimizer: optax.GradientTransformation,
                       config: ml_collections.ConfigDict, mesh: Mesh) -> TrainState:
  """Initialises parameters from `config.seed` and the optimizer state, replicated on `mesh`."""

  def init(rng):
    params = init_params(model, config, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))

  return jax.jit(init, out_shardings=replicated(mesh))(jax.random.PRNGKey(config.seed))


def make_train_step(model: rils_lib.RILS, optimizer: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, mesh: Mesh
                    ) -> Callable[[TrainState, Dict[str, jax.Array]], Tuple[TrainState, Dict]]:
  """Builds the jitted train step `(state, batch) -> (new_state, metrics)`.

  `batch` holds `image` uint8 (B, H, W, 3) and `text` int32 (B, L), sharded over `data`. The
  masking noise comes from `fold_in(PRNGKey(config.seed + 1), step)`, so it depends on the step
  only, never on the device count. `state` is donated. Metrics are float32 scalars: those of
  `losses.rils_loss` plus `grad_norm` (before clipping) and `learning_rate`.
  """
  schedule = optim.learning_rate_schedule(config)
  num_patches = math.prod(model.grid_shape())
  max_log_scale = math.log(config.loss.max_logit_scale)
  masked_branch = config.loss.kind == 'rils'

  def step_fn(state: TrainState, batch):
    images = transforms.normalize(batch['image'], config.input)
    masking = None
    if masked_branch:
      rng = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), state.step)
      masking = vit.random_masking(rng, images.shape[0], num_patches, config.model.mask_ratio)

    def loss_fn(params):
      outputs = model.apply({'params': params}, images, batch['text'], masking)
      return losses.rils_loss(outputs, config.loss, config.loss.max_logit_scale)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # CLIP clamps the learnable log-scale so that exp(logit_scale) <= 100.
    params = {**params, 'logit_scale': jnp.minimum(params['logit_scale'], max_log_scale)}
    metrics.update(grad_norm=optax.tree.norm(grads), learning_rate=schedule(state.step))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  state_sharding = replicated(mesh)
  return jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding(mesh)),
                 out_shardings=(state_sharding, replicated(mesh)), donate_argnums=(0,))


def put_batch(batch: Dict[str, np.ndarray], mesh: Mesh) -> Dict[str, jax.Array]:
  """Assembles the global batch from this process's rows (`make_array_from_process_local_data`).

  Only the `image` and `text` entries go to the devices.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, batch[k]) for k in ('image', 'text')}
