r"""Measures the train step of a config and prints one JSON line.

  python -m rils_jax.benchmark --config=configs/vit_b16.py --config.input.batch_size=8

Fields: `compile_s` (lower + compile of the jitted step), `step_s` (median of `--steps` steps
after `--warmup`), `images_per_s`, `model_flops_per_step` (analytic, `rils_jax.flops`),
`model_tflops_per_s` (achieved), `matmul_tflops_per_s` (a large square matmul measured in the
same process, in the compute dtype), `fraction_of_matmul` (achieved / matmul: the portable
speed figure on shared machines), `mfu` (achieved / the chip's peak where the chip is known),
`hardware_flops_per_step`, `hardware_tflops_per_s`, `hardware_fraction_of_matmul` and `hfu`
(the same with the FLOPs the step executes: GradCache's extra forward pass when accumulating
and the remat policy's recomputation, `flops.hardware_flops`),
`peak_memory_bytes` (device peak where the runtime reports it, else the compiled step's
arguments + outputs + temporaries), `step_memory_bytes` (always the compiled step's: the figure
of this config alone when one process benchmarks several), `host_max_rss_bytes` and
`allocator` (the process's malloc, `rils_jax.allocator.describe`: on CPU it sets the step time).

Batches are random uint8 images and token rows made on the host: this measures the model, not
the input pipeline.
"""

import json
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from rils_jax import allocator
from rils_jax import console
from rils_jax import flops as flops_lib
from rils_jax import sharding
from rils_jax import train_step as train_step_lib


def _define_flags():
  # Defined only when run as a command, so that importing this module registers no flags.
  config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
  flags.DEFINE_integer('steps', 5, 'Timed steps.')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
  flags.DEFINE_integer('matmul_size', 0, 'Side of the reference matmul (0: 4096 on CPU, 8192 '
                       'on accelerators).')
  flags.mark_flags_as_required(['config'])

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets.
PEAK_FLOPS = {
    'H200': 989e12, 'H100': 989e12, 'A100': 312e12,
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12,
    'TPU v6 lite': 918e12, 'TPU v6e': 918e12,
}


def peak_flops(device) -> float:
  """Peak FLOP/s of one device of this kind, or 0 when unknown (e.g. CPU)."""
  kind = getattr(device, 'device_kind', '')
  return next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), 0.0)


def matmul_tflops(size: int, dtype) -> float:
  """Achieved TFLOP/s of a (size, size) @ (size, size) product on one device (median of 5)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(5):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return flops_lib.matmul_flops(size) / statistics.median(times) / 1e12


def random_batch(config, rng: np.random.Generator, eot_id: int):
  batch = train_step_lib.dummy_batch(config, config.input.batch_size)
  batch['image'] = rng.integers(0, 256, batch['image'].shape, dtype=np.uint8)
  length = batch['text'].shape[1]
  batch['text'] = rng.integers(3, config.model.text.vocab_size, batch['text'].shape,
                               dtype=np.int32)
  batch['text'][:, length // 2] = eot_id
  return batch


class DoesNotFit(Exception):
  """The compiled step needs more device memory than the limit given to `run`."""


def step_memory_bytes(compiled) -> int:
  """Device bytes of a compiled step's buffers: arguments + outputs - aliased (donated) + XLA's
  temporaries, or -1 where the backend does not say."""
  mem = compiled.memory_analysis()
  if mem is None:
    return -1
  return int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes)


def run(config, steps: int, warmup: int, matmul_size: int = 0, memory_limit_bytes: int = 0,
        reference_tflops: float = 0.0) -> dict:
  """Runs the benchmark and returns its figures (see the module docstring).

  Args:
    config: the run's config (`input.batch_size` is the global batch).
    steps, warmup: timed and untimed steps after compilation.
    matmul_size: side of the reference matmul (0: 4096 on CPU, 8192 elsewhere).
    memory_limit_bytes: when > 0, raise `DoesNotFit` before running a step whose compiled
      buffers exceed it (a batch search tries the next size instead of running out of memory).
    reference_tflops: the reference matmul's TFLOP/s on one device when already measured in
      this process (0: measure it).

  Raises:
    ValueError: for `steps` < 1 or `warmup` < 0.
    DoesNotFit: see `memory_limit_bytes`.
  """
  if steps < 1 or warmup < 0:
    raise ValueError(f'--steps={steps} must be >= 1 and --warmup={warmup} >= 0')
  setup = train_step_lib.setup(config)
  model = setup.model
  state = train_step_lib.create_train_state(setup, config.seed)
  step = train_step_lib.make_train_step(setup, config)
  batch = sharding.put_batch(random_batch(config, np.random.default_rng(0), model.eot_id),
                             setup.mesh)

  t = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  step_memory = step_memory_bytes(compiled)
  if memory_limit_bytes and step_memory > memory_limit_bytes:
    raise DoesNotFit(f'the step needs {step_memory / 2**30:.1f} GiB, over the limit of '
                     f'{memory_limit_bytes / 2**30:.1f} GiB')
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  step_s = statistics.median(times)

  device = jax.devices()[0]
  flops = flops_lib.train_step_flops(config)['total']
  hardware = flops_lib.hardware_flops(config)['total']
  achieved = flops / step_s / 1e12
  achieved_hardware = hardware / step_s / 1e12
  on_cpu = device.platform == 'cpu'
  size = matmul_size or (4096 if on_cpu else 8192)
  dtype = model.dtype
  reference = reference_tflops or matmul_tflops(size, dtype)
  stats = device.memory_stats() or {}
  peak_memory = int(stats.get('peak_bytes_in_use', step_memory))
  peak = peak_flops(device) * jax.device_count()
  return dict(
      config=dict(variant=config.model.variant, image_size=config.model.image_size,
                  batch_size=config.input.batch_size, dtype=jnp.dtype(model.dtype).name,
                  loss=config.loss.kind + ('+sigmoid' if config.loss.get('contrastive') ==
                                           'sigmoid' else '')),
      device=f'{jax.device_count()}x {device.device_kind}',
      compile_s=round(compile_s, 3), step_s=round(step_s, 4),
      images_per_s=round(config.input.batch_size / step_s, 2),
      model_flops_per_step=flops, model_tflops_per_s=round(achieved, 4),
      matmul_tflops_per_s=round(reference * jax.device_count(), 4),
      matmul=f'{size}x{size} {jnp.dtype(dtype).name}',
      fraction_of_matmul=round(achieved / (reference * jax.device_count()), 4),
      mfu=round(achieved * 1e12 / peak, 4) if peak else None,
      hardware_flops_per_step=hardware, hardware_tflops_per_s=round(achieved_hardware, 4),
      hardware_fraction_of_matmul=round(achieved_hardware / (reference * jax.device_count()), 4),
      hfu=round(achieved_hardware * 1e12 / peak, 4) if peak else None,
      peak_memory_bytes=peak_memory, step_memory_bytes=step_memory,
      host_max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      allocator=allocator.describe(), loss=float(metrics['loss']))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  print(json.dumps(run(f.config, f.steps, f.warmup, f.matmul_size)))


if __name__ == '__main__':
  _define_flags()
  console.run(main)
