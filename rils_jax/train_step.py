"""Train state, its shardings and the jitted, sharded RILS train step.

The step is one `jax.jit` with explicit `in_shardings` / `out_shardings` over the mesh of
`rils_jax.sharding`: the batch is split over the data-parallel axes, parameters and optimizer
state follow the logical-axis rules (replicated, FSDP-sharded and / or tensor-parallel), and the
state buffers are donated. Losses are computed on the global batch inside the one SPMD program,
so the CLIP logits and the reconstruction prototypes span all devices and hosts with exact
gradients.

Gradient accumulation (`config.optim.accum_steps` = A > 1) is GradCache (Gao et al. 2021,
"Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"): the contrastive and
reconstruction losses couple the whole batch, so summing independent micro-batch losses would
change the objective (fewer negatives, fewer prototypes). Instead, (1) every micro-batch's
outputs (embeddings, student and teacher features) are computed without keeping activations,
(2) the loss of the whole batch and its gradient with respect to those outputs are computed,
(3) each micro-batch's forward pass is re-run and its output gradient back-propagated. The
result is the full-batch gradient (up to float rounding) with the activation memory of one
micro-batch, for one extra forward pass.
"""

import math
from typing import Any, Callable, Dict, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rils_jax import losses
from rils_jax import optim
from rils_jax import sharding
from rils_jax.data import transforms
from rils_jax.models import rils as rils_lib
from rils_jax.models import vit


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly, except the input pipeline's position.

  step: int32 scalar, train steps taken (= global batches consumed, skipped updates included).
  params: float32 pytree. opt_state: optax state pytree.
  rng: uint32 (2,) key data of the masking noise; step t uses `fold_in(rng, t)`.
  skipped_examples: int32 scalar, unreadable images dropped by the input pipeline so far (all
    processes).
  nonfinite_steps: int32 scalar, steps whose update was skipped for a NaN/Inf loss or gradient.
  consecutive_nonfinite: int32 scalar, such steps in a row up to the current one.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  skipped_examples: jax.Array
  nonfinite_steps: jax.Array
  consecutive_nonfinite: jax.Array


def dummy_batch(config: ml_collections.ConfigDict, batch_size: int) -> Dict[str, np.ndarray]:
  """All-zero batch with the device-side shapes and dtypes of the train step's input (uint8
  images, int32 text, int32 skip counts).

  Shapes only: the text rows hold no end-of-text token, so the text tower pools position 0.
  """
  size = config.model.image_size
  return dict(image=np.zeros((batch_size, size, size, 3), np.uint8),
              text=np.zeros((batch_size, config.model.text.context_length), np.int32),
              skipped=np.zeros((batch_size,), np.int32))


def boxed_params(model: rils_lib.RILS, config: ml_collections.ConfigDict, rng: jax.Array):
  """Initial parameters (masked branch included) as `nn.LogicallyPartitioned` leaves, which
  carry each parameter's logical axis names."""
  batch = dummy_batch(config, 2)
  images = transforms.normalize(batch['image'], config.input)
  masking = vit.random_masking(jax.random.PRNGKey(0), 2, math.prod(model.grid_shape()),
                               config.model.mask_ratio)
  return model.init(rng, images, batch['text'], masking)['params']


def init_params(model: rils_lib.RILS, config: ml_collections.ConfigDict, rng: jax.Array):
  """Initial float32 parameters of `model`, as plain arrays."""
  return nn.unbox(boxed_params(model, config, rng))


def state_shardings(model: rils_lib.RILS, optimizer: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, mesh: Mesh) -> TrainState:
  """NamedShardings of the train state: parameters by `config.sharding_rules`, each optimizer
  moment like its parameter, step and counters replicated. Computes shapes only."""
  rules = sharding.rules_of(config)
  boxed = jax.eval_shape(lambda: boxed_params(model, config, jax.random.PRNGKey(0)))
  params = sharding.tree_shardings(boxed, mesh, rules)
  abstract_opt_state = jax.eval_shape(optimizer.init, nn.unbox(boxed))
  opt_state = optax.tree_map_params(
      optimizer, lambda _, s: s, abstract_opt_state, params,
      transform_non_params=lambda _: sharding.replicated(mesh))
  replicated = sharding.replicated(mesh)
  return TrainState(step=replicated, params=params, opt_state=opt_state, rng=replicated,
                    skipped_examples=replicated, nonfinite_steps=replicated,
                    consecutive_nonfinite=replicated)


def _init_state(model, optimizer, config, rng) -> TrainState:
  params = init_params(model, config, rng)
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=optimizer.init(params),
                    rng=jax.random.key_data(jax.random.PRNGKey(config.seed + 1)),
                    skipped_examples=zero, nonfinite_steps=zero, consecutive_nonfinite=zero)


def create_train_state(model: rils_lib.RILS, optimizer: optax.GradientTransformation,
                       config: ml_collections.ConfigDict, mesh: Mesh) -> TrainState:
  """Initialises parameters from `config.seed` and the optimizer state, laid out on `mesh` by
  `state_shardings` (each device creates only its shard)."""
  shardings = state_shardings(model, optimizer, config, mesh)
  return jax.jit(lambda rng: _init_state(model, optimizer, config, rng),
                 out_shardings=shardings)(jax.random.PRNGKey(config.seed))


def abstract_train_state(model, optimizer, config, mesh) -> TrainState:
  """The train state as ShapeDtypeStructs with shardings (for the dry run)."""
  shardings = state_shardings(model, optimizer, config, mesh)
  shapes = jax.eval_shape(lambda: _init_state(model, optimizer, config, jax.random.PRNGKey(0)))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, shardings)


def masking_for(model: rils_lib.RILS, config: ml_collections.ConfigDict, rng: jax.Array,
                batch: int):
  """The masked branch's `vit.Masking` for `batch` images, or None for `loss.kind` 'clip'."""
  if config.loss.kind != 'rils':
    return None
  return vit.random_masking(rng, batch, math.prod(model.grid_shape()), config.model.mask_ratio)


def forward(model: rils_lib.RILS, config: ml_collections.ConfigDict, mesh: Mesh, params,
            images, tokens, masking) -> Dict[str, jax.Array]:
  """`model.apply`, with the activations pinned to `mesh` by `config.sharding_rules`."""
  with sharding.activation_sharding(mesh, sharding.rules_of(config)):
    return model.apply({'params': params}, images, tokens, masking)


def check_accumulation(config: ml_collections.ConfigDict, mesh: Mesh) -> int:
  """Returns `config.optim.accum_steps`.

  Raises:
    ValueError: if it is not >= 1, or the batch does not split into that many micro-batches
      that each divide over the data-parallel devices of `mesh`.
  """
  accum, batch = config.optim.accum_steps, config.input.batch_size
  shards = sharding.data_parallel_size(mesh)
  if accum < 1:
    raise ValueError(f'config.optim.accum_steps={accum} must be >= 1')
  if batch % (accum * shards):
    raise ValueError(f'config.input.batch_size={batch} must split into '
                     f'config.optim.accum_steps={accum} micro-batches, each a multiple of the '
                     f'{shards} data-parallel devices of mesh {dict(mesh.shape)}')
  return accum


def make_train_step(model: rils_lib.RILS, optimizer: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, mesh: Mesh
                    ) -> Callable[[TrainState, Dict[str, jax.Array]], Tuple[TrainState, Dict]]:
  """Builds the jitted train step `(state, batch) -> (new_state, metrics)`.

  `batch` holds `image` uint8 (B, H, W, 3), `text` int32 (B, L) and `skipped` int32 (B,)
  (unreadable images dropped before each example), sharded over the data-parallel axes. The
  masking noise comes from `fold_in(state.rng, step)` for the whole global batch, so it depends
  on the step only, never on the device count or the accumulation. `state` is donated.

  A step whose loss or gradient norm is NaN or Inf changes neither the parameters nor the
  optimizer state; it still advances `step` (its batch is consumed) and counts in
  `nonfinite_steps` and `consecutive_nonfinite` (reset by the next finite step). The caller
  decides when a run of them should stop training (`rils_jax.main`).
  `config.debug.nan_loss_steps` (1-based step numbers) multiplies the loss by NaN at those
  steps, which makes the loss and every gradient NaN: fault injection for testing the guard.

  Metrics are float32 scalars: those of `losses.rils_loss` plus `grad_norm` (before clipping),
  `learning_rate`, `nonfinite` (1 for a skipped update), and the state's counters
  `skipped_examples`, `nonfinite_steps` and `consecutive_nonfinite`.

  Raises:
    ValueError: if the batch does not split into `config.optim.accum_steps` micro-batches that
      each divide over the data-parallel devices.
  """
  schedule = optim.learning_rate_schedule(config)
  max_log_scale = math.log(config.loss.max_logit_scale)
  accum = check_accumulation(config, mesh)
  shardings = state_shardings(model, optimizer, config, mesh)

  nan_loss_steps = tuple(int(s) for s in config.debug.nan_loss_steps)

  def loss_of(outputs, fault):
    loss, metrics = losses.rils_loss(outputs, config.loss, config.loss.max_logit_scale)
    return loss * fault, {**metrics, 'loss': metrics['loss'] * fault}

  def full_batch_gradients(params, images, tokens, masking, fault):
    def loss_fn(p):
      return loss_of(forward(model, config, mesh, p, images, tokens, masking), fault)

    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  def cached_gradients(params, images, tokens, masking, fault):
    # GradCache (see the module docstring). Micro-batch a holds rows a, a + A, a + 2A, ...: a
    # strided split keeps every micro-batch spread over all data-parallel devices.
    micro_sharding = NamedSharding(mesh, P(None, sharding.BATCH_AXES))

    def split(x):
      x = jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)
      return jax.lax.with_sharding_constraint(x, micro_sharding)

    def merge(x):
      return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])

    def features(p, micro_batch):
      out = dict(forward(model, config, mesh, p, *micro_batch))
      del out['logit_scale']  # A parameter, not a per-example output.
      return out

    micro = jax.tree.map(split, (images, tokens, masking))
    _, outputs = jax.lax.scan(lambda _, mb: (None, features(params, mb)), None, micro)
    outputs = jax.tree.map(merge, outputs)
    (loss, metrics), (d_outputs, d_logit_scale) = jax.value_and_grad(
        lambda o, s: loss_of({**o, 'logit_scale': s}, fault), argnums=(0, 1), has_aux=True)(
            outputs, params['logit_scale'])

    def backward(grads, xs):
      micro_batch, d_out = xs
      _, vjp = jax.vjp(lambda p: features(p, micro_batch), params)
      return jax.tree.map(jnp.add, grads, vjp(d_out)[0]), None

    zeros = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, params),
                                             shardings.params)
    grads, _ = jax.lax.scan(backward, zeros, (micro, jax.tree.map(split, d_outputs)))
    grads = {**grads, 'logit_scale': grads['logit_scale'] + d_logit_scale}
    return (loss, metrics), grads

  gradients = full_batch_gradients if accum == 1 else cached_gradients

  def step_fn(state: TrainState, batch):
    images = transforms.normalize(batch['image'], config.input)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    masking = masking_for(model, config, rng, images.shape[0])
    fault = jnp.float32(1.0)
    if nan_loss_steps:
      fault = jnp.where(jnp.isin(state.step + 1, jnp.array(nan_loss_steps)), jnp.nan, 1.0)
    (loss, metrics), grads = gradients(state.params, images, batch['text'], masking, fault)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # CLIP clamps the learnable log-scale so that exp(logit_scale) <= 100.
    params = {**params, 'logit_scale': jnp.minimum(params['logit_scale'], max_log_scale)}
    grad_norm = optax.tree.norm(grads)
    # One bad batch or overflow must not poison the run: keep the previous parameters and
    # moments (a NaN would otherwise spread into every weight through Adam's moments).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                     (params, opt_state), (state.params, state.opt_state))
    bad = 1 - finite.astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state,
        skipped_examples=state.skipped_examples + jnp.sum(batch['skipped']),
        nonfinite_steps=state.nonfinite_steps + bad,
        consecutive_nonfinite=(state.consecutive_nonfinite + 1) * bad)
    metrics.update(grad_norm=grad_norm, learning_rate=schedule(state.step), nonfinite=bad,
                   skipped_examples=new_state.skipped_examples,
                   nonfinite_steps=new_state.nonfinite_steps,
                   consecutive_nonfinite=new_state.consecutive_nonfinite)
    return new_state, metrics

  return jax.jit(step_fn, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def process_rows(mesh: Mesh, global_batch: int) -> Tuple[int, int]:
  """Rows [start, stop) of the global batch that live on this process's devices.

  Raises:
    ValueError: if they are not one contiguous block (an unusual device order).
  """
  index_map = sharding.batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
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
  batch_sharding = sharding.batch_sharding(mesh)
  local = {'image': batch['image'], 'text': batch['text'],
           'skipped': np.asarray(batch.get('skipped', np.zeros(len(batch['image']))), np.int32)}
  return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}
