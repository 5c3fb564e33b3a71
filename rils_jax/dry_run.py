r"""Memory dry run: compiles the train step of a config on a virtual mesh, without data.

  python -m rils_jax.dry_run --config=configs/vit_l16.py:platform=tpu_v4_64
  python -m rils_jax.dry_run --config=configs/vit_b16.py:platform=gpu_8xh100 \
      --config.model.remat=none

The mesh is made of `--num_devices` virtual CPU devices (default: the platform preset's device
count, else 8), so the program is partitioned exactly as on the real machine: same per-device
shapes of parameters, optimizer state and batch, same collectives. It prints one JSON line:

  params_bytes, opt_state_bytes,  per-device bytes of the sharded parameters, optimizer state and
  grads_bytes                     gradients (exact: they follow from shapes and shardings);
  activation_bytes                per-device bytes that the backward pass keeps from the forward
                                  pass: the residuals of JAX's autodiff for one micro-batch
                                  (model) plus the whole batch's loss, under the config's remat
                                  policy, batch-led residuals divided over the data-parallel
                                  devices (others, e.g. bfloat16 weight copies, counted whole);
  host_offload_bytes              the part of those residuals that `remat='offload'` keeps in
                                  host memory instead (not in activation_bytes or the estimate);
  estimate_bytes                  params + opt_state + grads + activations (+ the cached
                                  micro-batch outputs when accumulating);
  device_memory_bytes, fits       the preset's memory per device; whether the estimate fits in
                                  90% of it (the rest: XLA workspace, fragmentation);
  xla_cpu                         the compiled step's buffer assignment on one device
                                  (`memory_analysis`: argument, output, alias, temp, peak).

Why two figures: XLA:CPU drops the optimisation barriers that keep rematerialisation from
being undone, so its `temp` does not shrink with remat (measured here: a plain `jax.checkpoint`
chain compiles to the same temp size with and without it), while the TPU and GPU compilers keep
them. The residual count is what those compilers must hold at the end of the forward pass; the
compile checks that the sharded program builds and gives XLA's own (remat-blind) upper bound.
Nothing is allocated; compiling ViT-L takes a few minutes on 2 cores.
"""

import json
import math
import time

from typing import Tuple

import jax
import jax.numpy as jnp
from absl import app
from absl import flags
from ml_collections import config_flags

from rils_jax import console
from rils_jax import losses
from rils_jax import sharding
from rils_jax import train_step as train_step_lib
from rils_jax.models import rils as rils_lib


def _define_flags():
  # Defined only when run as a command, so that importing this module registers no flags.
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:arg]).',
                                  lock_config=True)
  flags.DEFINE_integer('num_devices', 0, 'Virtual devices (0: the platform preset\'s count, '
                       'else 8).')
  flags.mark_flags_as_required(['config'])


def _residual_bytes(fn, args, batch_size: int, shards: int) -> Tuple[int, int]:
  """Bytes per device of what `jax.vjp(fn, *args)` keeps for the backward pass, not counting
  the arguments themselves, as (in device memory, in host memory): residuals that a remat
  policy offloads (`remat='offload'`) carry the host memory space in their type. An array with
  a dimension of `batch_size` (activations) is split over `shards` devices, unless it has the
  shape of an argument that has none (e.g. a bfloat16 copy of a weight matrix whose width
  happens to equal the batch)."""
  closed, shapes = jax.make_jaxpr(lambda *a: jax.vjp(fn, *a), return_shape=True)(*args)
  jaxpr = closed.jaxpr
  residuals = jaxpr.outvars[len(jaxpr.outvars) - len(jax.tree.leaves(shapes[1])):]
  inputs = {id(v) for v in jaxpr.invars}
  argument_shapes = {tuple(v.aval.shape) for v in jaxpr.invars
                     if batch_size not in v.aval.shape}
  total, host, seen = 0, 0, set()
  for v in residuals:
    if hasattr(v, 'val') or id(v) in inputs or id(v) in seen:  # Literals, arguments, repeats.
      continue
    seen.add(id(v))
    shape = tuple(v.aval.shape)
    size = math.prod(shape) * v.aval.dtype.itemsize
    size = size // shards if batch_size in shape and shape not in argument_shapes else size
    if getattr(v.aval, 'memory_space', None) == jax.memory.Space.Host:
      host += size
    else:
      total += size
  return total, host


def activation_bytes(model, config, mesh) -> dict:
  """Per-device bytes kept between the forward and backward pass (see the module docstring)."""
  shards = sharding.data_parallel_size(mesh)
  batch, accum = config.input.batch_size, config.optim.accum_steps
  micro = batch // accum
  params = jax.eval_shape(lambda: rils_lib.init_params(model, jax.random.PRNGKey(0)))

  def features(p, size):
    dummy = train_step_lib.dummy_batch(config, size)
    masking = train_step_lib.masking_for(model, config, jax.random.PRNGKey(0), size)
    return train_step_lib.forward(model, config, mesh, p, jnp.asarray(dummy['image'], jnp.float32),
                                  jnp.asarray(dummy['text']), masking)

  def loss(outputs):
    return losses.rils_loss(outputs, config.loss)[0]

  if accum == 1 or config.loss.kind == 'mae':
    # MAE accumulates by summing micro-batch gradients: one micro-batch's residuals, no cache.
    size = batch if accum == 1 else micro
    model_bytes, host = _residual_bytes(lambda p: loss(features(p, size)), (params,), size,
                                        shards)
    return dict(model=model_bytes, host=host, cached_outputs=0)
  outputs = jax.eval_shape(lambda p: features(p, batch), params)
  model_bytes, host = _residual_bytes(lambda p: features(p, micro), (params,), micro, shards)
  loss_bytes, _ = _residual_bytes(loss, (outputs,), batch, shards)
  cached = sum(math.prod(x.shape) * x.dtype.itemsize // shards
               for x in jax.tree.leaves(outputs) if x.shape)
  return dict(model=model_bytes + loss_bytes, host=host, cached_outputs=cached)


def dry_run(config, compile_step: bool = True) -> dict:
  """Lowers and compiles the train step of `config` on the current devices; returns the
  figures described in the module docstring (without `xla_cpu` when `compile_step` is False).

  Raises:
    ValueError: for a config that does not fit the devices (mesh, batch, accumulation).
  """
  setup = train_step_lib.setup(config)
  model, mesh, state = setup.model, setup.mesh, setup.abstract_state
  batch_sharding = sharding.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding) for k, v in
           train_step_lib.dummy_batch(config, config.input.batch_size).items()}
  step = train_step_lib.make_train_step(setup, config)
  activations = activation_bytes(model, config, mesh)
  out = dict(
      config=dict(variant=config.model.variant, batch_size=config.input.batch_size,
                  accum_steps=config.optim.accum_steps, dtype=config.model.dtype,
                  remat=config.model.remat, mu_dtype=config.optim.mu_dtype,
                  chunk_size=config.loss.chunk_size,
                  platform=config.get('platform', {}).get('name', '')),
      mesh=dict(mesh.shape), num_devices=mesh.size,
      micro_batch_per_device=config.input.batch_size // config.optim.accum_steps // (
          sharding.data_parallel_size(mesh)),
      num_params=int(sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))),
      params_bytes=sharding.describe(state.params)['per_device_bytes'],
      opt_state_bytes=sharding.describe(state.opt_state)['per_device_bytes'])
  out['grads_bytes'] = out['params_bytes']  # float32, sharded like the parameters.
  out['activation_bytes'] = activations['model']
  out['host_offload_bytes'] = activations['host']  # remat='offload': not in device memory.
  out['cached_output_bytes'] = activations['cached_outputs']
  out['estimate_bytes'] = (out['params_bytes'] + out['opt_state_bytes'] + out['grads_bytes'] +
                           out['activation_bytes'] + out['cached_output_bytes'])
  gib = config.get('platform', {}).get('memory_gib', 0)
  if gib:
    out['device_memory_bytes'] = int(gib * 2**30)
    out['fits'] = out['estimate_bytes'] <= 0.9 * out['device_memory_bytes']
  if not compile_step:
    return out
  start = time.time()
  memory = step.lower(state, batch).compile().memory_analysis()
  compile_s = time.time() - start
  out['xla_cpu'] = dict(argument_bytes=memory.argument_size_in_bytes,
                        output_bytes=memory.output_size_in_bytes,
                        alias_bytes=memory.alias_size_in_bytes,
                        temp_bytes=memory.temp_size_in_bytes,
                        peak_bytes=(memory.argument_size_in_bytes + memory.output_size_in_bytes -
                                    memory.alias_size_in_bytes + memory.temp_size_in_bytes),
                        compile_s=round(compile_s, 1))
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = flags.FLAGS.config
  if flags.FLAGS.num_devices < 0:
    raise app.UsageError(f'--num_devices={flags.FLAGS.num_devices} must be >= 0')
  num_devices = flags.FLAGS.num_devices or config.get('platform', {}).get('num_devices', 8)
  # Before any backend starts: the virtual devices the mesh is made of.
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', num_devices)
  print(json.dumps(dry_run(config)), flush=True)


if __name__ == '__main__':
  _define_flags()
  console.run(main)
