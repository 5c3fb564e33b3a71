"""The train state, what a run builds before reading data (`Setup`), and the jitted, sharded
RILS train step.

The step is one `jax.jit` with explicit `in_shardings` / `out_shardings` over the mesh of
`rils_jax.sharding`: the batch is split over the data-parallel axes, parameters and optimizer
state follow the logical-axis rules (replicated, FSDP-sharded and / or tensor-parallel), and the
state buffers are donated. Losses are computed on the global batch inside the one SPMD program,
so the CLIP logits and the reconstruction prototypes span all devices and hosts with exact
gradients. Gradient accumulation (`config.optim.accum_steps` > 1) is GradCache
(rils_jax/grad_cache.py) for the losses that couple the batch, plain summing for MAE's, so the
update is the full-batch one.
"""

import dataclasses
import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rils_jax import grad_cache
from rils_jax import losses
from rils_jax import optim
from rils_jax import sharding
from rils_jax import tokenizer as tokenizer_lib
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


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a run builds from its config before it reads any data, built once by `setup`.

  mesh: the device mesh. model: the `RILS` module. optimizer: the optax transformation.
  abstract_state: a `TrainState` of ShapeDtypeStructs with their NamedShardings (parameters by
    the sharding rules, each optimizer moment like its parameter, counters replicated): what a
    checkpoint is restored into and what the dry run compiles against.
  accum_steps: micro-batches per step (`config.optim.accum_steps`).
  """
  mesh: Mesh
  model: rils_lib.RILS
  optimizer: optax.GradientTransformation
  abstract_state: TrainState
  accum_steps: int

  @property
  def shardings(self) -> TrainState:
    """The train state's NamedShardings (those of `abstract_state`)."""
    return jax.tree.map(lambda x: x.sharding, self.abstract_state)

  def with_eot_id(self, eot_id: int) -> 'Setup':
    """The same set-up with the text tower pooling at `eot_id` (the run's tokenizer is known
    only after the data is read; shapes and shardings do not depend on it)."""
    return dataclasses.replace(self, model=self.model.clone(eot_id=eot_id))


def check_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> int:
  """Checks that `config.input.batch_size` splits over the devices, the processes and
  `config.optim.accum_steps` micro-batches that each divide over the data-parallel devices of
  `mesh`; returns the number of micro-batches.

  Raises:
    ValueError: naming the sizes that do not divide (also `config.loss.release_gpus`, which
      must divide the global batch).
  """
  batch, devices, processes = config.input.batch_size, mesh.size, jax.process_count()
  if batch < 1 or batch % devices or batch % processes:
    raise ValueError(f'config.input.batch_size={batch} must be a positive multiple of the '
                     f'{devices} devices and {processes} processes')
  accum, shards = config.optim.accum_steps, sharding.data_parallel_size(mesh)
  if accum < 1:
    raise ValueError(f'config.optim.accum_steps={accum} must be >= 1')
  losses.check_config(config.loss, batch)
  if batch % (accum * shards):
    raise ValueError(f'config.input.batch_size={batch} must split into '
                     f'config.optim.accum_steps={accum} micro-batches, each a multiple of the '
                     f'{shards} data-parallel devices of mesh {dict(mesh.shape)}')
  return accum


def check_platform(config: ml_collections.ConfigDict, *, backend: Optional[str] = None,
                   devices: Optional[int] = None, local_devices: Optional[int] = None) -> None:
  """A training run's platform preset (rils_jax/platforms.py) must be this machine's (the dry
  run and the benchmark measure a preset on any number of devices). `backend`, `devices` and
  `local_devices` replace JAX's backend, device count and this process's device count (tests).

  Raises:
    ValueError: when the batch is not a multiple of the preset's images per micro-batch, or the
      preset is for another number of devices; on GPUs, first when each
      process uses fewer GPUs than a node of the preset has and the job is short of devices
      (one process per node under SLURM gets one GPU), naming the launch that fixes it.
  """
  platform = config.get('platform')
  if not platform:
    return
  backend = jax.default_backend() if backend is None else backend
  devices = jax.device_count() if devices is None else devices
  local_devices = jax.local_device_count() if local_devices is None else local_devices
  per_node = platform.num_devices // platform.num_hosts
  if backend == 'gpu' and devices < platform.num_devices and local_devices < per_node:
    nodes = platform.num_hosts
    raise ValueError(
        f'platform preset {platform.name} is for {nodes} node(s) x {per_node} GPUs, but each '
        f'process of this job uses {local_devices} GPU(s) ({devices} in all): with one process '
        'per node, JAX gives a SLURM task only the GPU of its SLURM_LOCALID. Run one process per '
        f'GPU: sbatch --nodes={nodes} --ntasks-per-node={per_node} --gpus-per-node={per_node} '
        f'launch/slurm.sbatch, or launch/slurm.sh --nodes={nodes} --gpus_per_node={per_node}; '
        'or one process per node with all its GPUs: launch/gpu_multinode.sh')
  if platform.num_devices != devices:
    raise ValueError(f'platform preset {platform.name} is for {platform.num_devices} devices '
                     f'({platform.accelerator}); this job has {devices}. Use the preset of this '
                     'machine, or none (then set config.mesh and config.optim.accum_steps)')
  per_step = platform.per_device_batch * platform.num_devices
  if config.input.batch_size % per_step:
    raise ValueError(f'config.input.batch_size={config.input.batch_size} is not a multiple of '
                     f'{per_step}, the images per micro-batch of platform preset {platform.name} '
                     f'({platform.per_device_batch} per device x {platform.num_devices} devices; '
                     'the accumulation is the batch / that)')


def check_offload(remat: str, devices: Sequence[Any]) -> None:
  """Refuses `config.model.remat='offload'` on devices without a host memory space to offload
  activations to ('pinned_host' in `device.addressable_memories()`; XLA:CPU has one, so the
  dry run can show the policy's numbers, though offloading there moves nothing).

  Raises:
    ValueError: naming the memory kinds the devices do offer.
  """
  if remat != 'offload':
    return
  for device in devices:
    kinds = [m.kind for m in device.addressable_memories()]
    if 'pinned_host' not in kinds:
      raise ValueError(f"config.model.remat='offload' keeps activations in host memory, but "
                       f'{device.device_kind} ({device.platform}) offers only memory kinds '
                       f"{kinds}; use remat='full' (least device memory) or 'block'")


def check_freeze(config: ml_collections.ConfigDict) -> None:
  """`config.model.freeze` must name a tower that the kind has ('mae' has no text tower, and
  locking its only tower leaves nothing to train).

  Raises:
    ValueError: naming the setting.
  """
  freeze = config.model.get('freeze', '')
  optim.frozen_names(freeze)
  if freeze and config.loss.kind == 'mae':
    raise ValueError(f"config.model.freeze={freeze!r} locks a tower of an image-text model; "
                     "config.loss.kind='mae' has the image tower only: set freeze=''")


def setup(config: ml_collections.ConfigDict, devices: Optional[Sequence[Any]] = None,
          eot_id: int = tokenizer_lib.EOS_ID) -> Setup:
  """Builds the mesh, model, optimizer, state shardings and abstract state of `config`,
  checking on the way everything the step needs (nothing is read or compiled).

  Args:
    config: the run's config.
    devices: the mesh's devices (default: all).
    eot_id: the text tower's end-of-text id (see `Setup.with_eot_id`); the tokenizers trained
      here use `tokenizer.EOS_ID`.

  Raises:
    ValueError: for a mesh that does not fit the devices, a malformed sharding rule, a batch
      that the devices, processes or micro-batches do not divide, a bad model size, dtype,
      remat policy or mask ratio, or a bad optimizer setting.
  """
  mesh = sharding.make_mesh(config, devices)
  rules = sharding.rules_of(config)
  accum = check_batch(config, mesh)
  platform, per_device = config.get('platform'), config.input.batch_size // accum // mesh.size
  if platform and per_device != platform.per_device_batch:
    logging.warning('config.input.batch_size=%d with accum_steps=%d puts %d images on each '
                    'device; preset %s is sized for %d', config.input.batch_size, accum,
                    per_device, platform.name, platform.per_device_batch)
  model = rils_lib.build_model(config, eot_id)
  check_freeze(config)
  check_offload(config.model.get('remat', 'none'), mesh.devices.flat)
  masking_for(model, config, jax.random.PRNGKey(0), 1)  # Raises for a degenerate mask ratio.
  optimizer = optim.make_optimizer(config)

  # Shapes only: the model's init and the optimizer's are traced, nothing is computed.
  boxed = jax.eval_shape(lambda: rils_lib.boxed_params(model, jax.random.PRNGKey(0)))
  params = flax.linen.unbox(boxed)
  opt_state = jax.eval_shape(optimizer.init, params)
  count = jax.ShapeDtypeStruct((), jnp.int32)
  rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.PRNGKey(0)))
  shapes = TrainState(step=count, params=params, opt_state=opt_state, rng=rng,
                      skipped_examples=count, nonfinite_steps=count, consecutive_nonfinite=count)
  replicated = sharding.replicated(mesh)
  param_shardings = sharding.tree_shardings(boxed, mesh, rules)
  shardings = TrainState(
      step=replicated, params=param_shardings,
      opt_state=optim.map_state_params(config, lambda _, s: s, opt_state, param_shardings,
                                       lambda _: replicated),
      rng=replicated, skipped_examples=replicated, nonfinite_steps=replicated,
      consecutive_nonfinite=replicated)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, shardings)
  return Setup(mesh, model, optimizer, abstract, accum)


def _init_state(model, optimizer, seed: int, rng) -> TrainState:
  params = rils_lib.init_params(model, rng)
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=optimizer.init(params),
                    rng=jax.random.key_data(jax.random.PRNGKey(seed + 1)),
                    skipped_examples=zero, nonfinite_steps=zero, consecutive_nonfinite=zero)


def create_train_state(setup: Setup, seed: int) -> TrainState:
  """Initial parameters from `seed` and the optimizer state, laid out by `setup.shardings`
  (each device creates only its shard). The masking noise is seeded with `seed + 1`."""
  return jax.jit(lambda rng: _init_state(setup.model, setup.optimizer, seed, rng),
                 out_shardings=setup.shardings)(jax.random.PRNGKey(seed))


def dummy_batch(config: ml_collections.ConfigDict, batch_size: int) -> Dict[str, np.ndarray]:
  """All-zero batch with the device-side shapes and dtypes of the train step's input (uint8
  images, int32 text, int32 skip counts).

  Shapes only: the text rows hold no end-of-text token, so the text tower pools position 0.
  """
  size = config.model.image_size
  return dict(image=np.zeros((batch_size, size, size, 3), np.uint8),
              text=np.zeros((batch_size, config.model.text.context_length), np.int32),
              skipped=np.zeros((batch_size,), np.int32))


def masking_for(model: rils_lib.RILS, config: ml_collections.ConfigDict, rng: jax.Array,
                batch: int, unmasked: bool = False):
  """The step's `vit.Masking` for `batch` images, or None for `loss.kind` 'clip' and for
  `unmasked` (FLIP's unmasked tuning: 'flip' on whole images)."""
  if config.loss.kind == 'clip' or (unmasked and config.loss.kind == 'flip'):
    return None
  return vit.random_masking(rng, batch, math.prod(model.grid_shape()),
                            rils_lib.mask_ratio(config),
                            config.model.get('keep_rounding', 'floor'))


def unmasked_from(config: ml_collections.ConfigDict) -> int:
  """The first step (1-based) of FLIP's unmasked tuning: total_steps - flip.unmasked_steps + 1
  for 'flip' with `flip.unmasked_steps` > 0, else never (total_steps + 1)."""
  if config.loss.kind != 'flip' or not config.flip.get('unmasked_steps', 0):
    return config.total_steps + 1
  return config.total_steps - config.flip.unmasked_steps + 1


# Parameters that the loss reads directly, beside the per-example outputs (GradCache).
LOSS_PARAMS = ('logit_scale', 'logit_bias')


def forward(model: rils_lib.RILS, config: ml_collections.ConfigDict, mesh: Mesh, params,
            images, tokens, masking) -> Dict[str, jax.Array]:
  """`model.apply`, with the activations pinned to `mesh` by `config.sharding_rules`."""
  with sharding.activation_sharding(mesh, sharding.rules_of(config)):
    return model.apply({'params': params}, images, tokens, masking)


def make_train_step(setup: Setup, config: ml_collections.ConfigDict, unmasked: bool = False
                    ) -> Callable[[TrainState, Dict[str, jax.Array]], Tuple[TrainState, Dict]]:
  """Builds the jitted train step `(state, batch) -> (new_state, metrics)`; with `unmasked`
  the step of FLIP's unmasked tuning (whole images; the same for other kinds).

  `config.model.freeze` (LiT) stop-gradients the locked towers (`optim.stop_frozen`): their
  gradient is zero and never computed, and the optimizer leaves them as they are.

  `batch` holds `image` uint8 (B, H, W, 3), `text` int32 (B, L) and `skipped` int32 (B,)
  (unreadable images dropped before each example), sharded over the data-parallel axes. The
  masking noise comes from `fold_in(state.rng, step)` for the whole global batch, so it depends
  on the step only, never on the device count or the accumulation. `state` is donated.

  A step whose loss or gradient norm is NaN or Inf changes neither the parameters nor the
  optimizer state (see `_guarded_update`). `config.debug.nan_loss_steps` (1-based step
  numbers) multiplies the loss by NaN at those steps, which makes the loss and every gradient
  NaN: fault injection for testing that guard.

  Metrics are float32 scalars: those of `losses.rils_loss` plus `grad_norm` (before clipping),
  `learning_rate`, `nonfinite` (1 for a skipped update), and the state's counters
  `skipped_examples`, `nonfinite_steps` and `consecutive_nonfinite`.
  """
  model, mesh, optimizer, shardings = setup.model, setup.mesh, setup.optimizer, setup.shardings
  schedule = optim.learning_rate_schedule(config)
  max_log_scale = math.log(config.loss.max_logit_scale)
  nan_loss_steps = tuple(int(s) for s in config.debug.nan_loss_steps)
  # Where the conditional guard was measured faster (see `_guarded_update`): one CPU process.
  conditional = (mesh.devices.flat[0].platform == 'cpu' and jax.process_count() == 1)

  freeze = config.model.get('freeze', '')

  def loss_of(outputs, fault):
    loss, metrics = losses.rils_loss(outputs, config.loss)
    return loss * fault, {**metrics, 'loss': metrics['loss'] * fault}

  def features(params, micro_batch):  # GradCache's per-example part: all but the loss's params.
    out = dict(forward(model, config, mesh, optim.stop_frozen(params, freeze), *micro_batch))
    return {k: v for k, v in out.items() if k not in LOSS_PARAMS}

  def gradients(params, inputs, fault):
    if setup.accum_steps == 1:
      return jax.value_and_grad(
          lambda p: loss_of(forward(model, config, mesh, optim.stop_frozen(p, freeze), *inputs),
                            fault), has_aux=True)(params)
    if config.loss.kind == 'mae':  # A mean over examples: plain accumulation is exact.
      return grad_cache.summed_gradients(
          lambda p, mb: loss_of(forward(model, config, mesh, p, *mb), fault), params, inputs,
          setup.accum_steps,
          micro_batch_sharding=NamedSharding(mesh, P(None, sharding.BATCH_AXES)),
          param_shardings=shardings.params)
    return grad_cache.grad_cache(
        features,
        lambda p, o: loss_of({**o, **{k: p[k] for k in LOSS_PARAMS if k in p}}, fault), params,
        inputs, setup.accum_steps,
        micro_batch_sharding=NamedSharding(mesh, P(None, sharding.BATCH_AXES)),
        param_shardings=shardings.params)

  def step_fn(state: TrainState, batch):
    images = transforms.normalize(batch['image'], config.input)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    masking = masking_for(model, config, rng, images.shape[0], unmasked)
    fault = jnp.float32(1.0)
    if nan_loss_steps:
      fault = jnp.where(jnp.isin(state.step + 1, jnp.array(nan_loss_steps)), jnp.nan, 1.0)
    (loss, metrics), grads = gradients(state.params, (images, batch['text'], masking), fault)
    params, opt_state, grad_norm, bad = _guarded_update(state, optimizer, grads, loss,
                                                        max_log_scale, conditional)
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


def _guarded_update(state: TrainState, optimizer, grads, loss, max_log_scale: float,
                    conditional: bool):
  """The optimizer update of `state` by `grads`, with the logit scale clamped to
  [0, max_log_scale], unless the loss or the gradient norm is not finite. Returns (params,
  opt_state, the gradient norm before clipping, int32 1 when the update was skipped else 0).

  `conditional`: the update inside a `lax.cond` on finiteness, else computed always and the old
  state selected leaf by leaf. The same values; the select reads every parameter and moment
  once more (ViT-B/16's AdamW on 2 CPU cores: 0.32 s against 0.16 s, README "Speed"). Taken
  for one CPU process only: there it measured faster; a GPU runs a conditional by copying its
  predicate to the host, and an earlier version with the gradient norm (as `grad_clip`'s is)
  inside the conditional ended two processes with other parameters than one.
  """
  grad_norm = optax.tree.norm(grads)
  # One bad batch or overflow must not poison the run: keep the previous parameters and
  # moments (a NaN would otherwise spread into every weight through Adam's moments). The step
  # still advances past its batch; `rils_jax.health` decides when a run of them stops training.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(params, opt_state, grads):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    # SLIP's loop clamps the parameter after the step, so that 1 <= exp(logit_scale) <= 100 and
    # the forward's exp is never clipped: the scale's gradient never vanishes at the cap.
    if 'logit_scale' in params:  # MAE has none.
      params = {**params, 'logit_scale': jnp.clip(params['logit_scale'], 0.0, max_log_scale)}
    return params, opt_state

  if conditional:
    params, opt_state = jax.lax.cond(finite, update, lambda p, o, _: (p, o),
                                     state.params, state.opt_state, grads)
  else:
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                     update(state.params, state.opt_state, grads),
                                     (state.params, state.opt_state))
  return params, opt_state, grad_norm, 1 - finite.astype(jnp.int32)
