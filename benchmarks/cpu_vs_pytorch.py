r"""Times rils_jax's train step beside its PyTorch twin (benchmarks/torch_rils.py) in one process
and prints one JSON line.

  .venv/bin/python benchmarks/cpu_vs_pytorch.py --config=configs/vit_b16.py \
      --config.input.batch_size=8

Both steps are compiled / warmed up, then `--rounds` rounds each time `--steps` JAX steps and
`--steps` PyTorch steps, alternating, so that a shared machine's load weighs on both alike.
Fields: `jax_step_s`, `torch_step_s` (medians of all timed steps), `*_steps_s` (every step, in
order), `images_per_s`, `jax_over_torch_speed` = torch_step_s / jax_step_s (>= 1: rils_jax is
faster), `round_ratios` (the same per round), `*_step_cpu_s` and `jax_over_torch_cpu` (the same
in CPU seconds of the process), the threads, `xla_flags` (what XLA parsed, i.e.
after `rils_jax.xla_cpu` added its defaults), `allocator` (the process's malloc, which both
frameworks share: start the script as README's "CPU hosts: the allocator" says to time both on
jemalloc or huge pages), the matmul TFLOP/s of each framework (`--matmul_size`, float32,
measured after the steps), the loss of the first step of each (same model at init, different
random init and masking: the same range, not equal), parameter counts per tower and the load
average before and after.

Float32 on both sides; the JAX step is `rils_jax.benchmark`'s (the training step of the config),
on captions cut after the batch's last end-of-text token as training cuts them
(`config.input.text_trim`; `--config.input.text_trim=0` times the whole context, as PyTorch's).
XLA_FLAGS are the environment's; `RILS_CPU_XLA_FLAGS=onednn` adds rils_jax.xla_cpu's oneDNN
flags (the default, none, measures XLA's own path). On a shared machine, `taskset -c 0` runs
both on one thread: their CPU-time ratio is then close to what an idle machine shows.
"""

import json
import os
import statistics
import sys
import time
from typing import Tuple

# Run as a script from the repository root: make `rils_jax`, `configs` and `benchmarks`
# importable without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# rils_jax first: it tunes glibc's malloc (rils_jax/allocator.py) before PyTorch's and XLA's
# threads allocate, for both frameworks alike.
import rils_jax  # noqa: E402,F401
import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import torch_rils  # noqa: E402
from rils_jax import allocator  # noqa: E402
from rils_jax import benchmark  # noqa: E402
from rils_jax import console  # noqa: E402
from rils_jax import sharding  # noqa: E402
from rils_jax import train_step as train_step_lib  # noqa: E402
from rils_jax.data import pipeline  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
flags.DEFINE_integer('rounds', 3, 'Alternating rounds.')
flags.DEFINE_integer('steps', 2, 'Timed steps of each framework per round.')
flags.DEFINE_integer('warmup', 1, 'Untimed steps of each framework after compilation.')
flags.DEFINE_integer('matmul_size', 2048, 'Side of the reference float32 matmul.')
flags.DEFINE_integer('torch_threads', 0, 'torch.set_num_threads (0: the CPUs this process '
                     'may use).')
flags.DEFINE_enum('adamw', 'fused', ['fused', 'foreach', 'loop'], "PyTorch's AdamW kernel.")
flags.mark_flags_as_required(['config'])


def torch_matmul_tflops(size: int) -> float:
  """Achieved TFLOP/s of a float32 (size, size) @ (size, size) torch.mm (median of 5)."""
  a = torch.randn(size, size)
  torch.mm(a, a)
  times = []
  for _ in range(5):
    t = time.perf_counter()
    torch.mm(a, a)
    times.append(time.perf_counter() - t)
  return 2 * size ** 3 / statistics.median(times) / 1e12


def jax_parameter_counts(params) -> dict:
  """Parameters per top-level group (`visual`, `decoder`, `text`, the rest) of rils_jax."""
  counts = {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in params.items()
            if isinstance(v, dict)}
  counts['top_level'] = sum(v.size for v in params.values() if not isinstance(v, dict))
  counts['total'] = sum(counts.values())
  return counts


def timed(fn) -> Tuple[float, float]:
  """(wall seconds, CPU seconds of this process) of fn()."""
  t, c = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - t, time.process_time() - c


def run(config, rounds: int, steps: int, warmup: int, matmul_size: int, threads: int,
        adamw: str) -> dict:
  """Compiles and warms up both steps, times them alternately; returns the figures (see the
  module docstring)."""
  load_before = os.getloadavg()
  threads = threads or len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)

  setup = train_step_lib.setup(config)
  state = train_step_lib.create_train_state(setup, config.seed)
  host_batch = benchmark.random_batch(config, np.random.default_rng(0), setup.model.eot_id)
  # The step as training runs it: captions cut after the batch's last end-of-text token
  # (`config.input.text_trim`); the PyTorch twin, as open_clip, always runs the whole context.
  jax_text = pipeline.trim_text(host_batch['text'], setup.model.eot_id,
                                pipeline.text_trim_multiple(config))
  batch = sharding.put_batch({**host_batch, 'text': jax_text}, setup.mesh)
  t = time.perf_counter()
  compiled = train_step_lib.make_train_step(setup, config).lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  state, metrics = compiled(state, batch)
  jax_first_loss = float(metrics['loss'])

  torch.manual_seed(config.seed)
  model = torch_rils.build_model(config, setup.model.eot_id)
  torch_step = torch_rils.make_train_step(
      model, torch_rils.make_optimizer(model, config, adamw), config)
  images, tokens = torch_rils.as_torch_batch(host_batch)
  torch_first_loss = torch_step(images, tokens)['loss']

  def jax_step():
    nonlocal state, metrics
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)

  for _ in range(warmup - 1):
    jax_step()
    torch_step(images, tokens)
  jax_times, torch_times, jax_cpu, torch_cpu, round_ratios = [], [], [], [], []
  for _ in range(rounds):
    j = [timed(jax_step) for _ in range(steps)]
    p = [timed(lambda: torch_step(images, tokens)) for _ in range(steps)]
    jax_times += [w for w, _ in j]
    torch_times += [w for w, _ in p]
    jax_cpu += [c for _, c in j]
    torch_cpu += [c for _, c in p]
    round_ratios.append(round(statistics.median(w for w, _ in p)
                              / statistics.median(w for w, _ in j), 3))
  jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
  batch_size = config.input.batch_size
  return dict(
      config=dict(variant=config.model.variant, batch_size=batch_size,
                  image_size=config.model.image_size, loss=config.loss.kind,
                  dtype=jax.numpy.dtype(setup.model.dtype).name),
      jax_step_s=round(jax_s, 3), torch_step_s=round(torch_s, 3),
      jax_over_torch_speed=round(torch_s / jax_s, 3), round_ratios=round_ratios,
      jax_images_per_s=round(batch_size / jax_s, 3),
      torch_images_per_s=round(batch_size / torch_s, 3),
      jax_steps_s=[round(x, 3) for x in jax_times],
      torch_steps_s=[round(x, 3) for x in torch_times],
      # CPU seconds per step: on a loaded machine (see load_*) the ratio of medians of CPU time
      # is steadier than wall time, and under `taskset -c 0` (one thread each) it is the
      # idle-machine ratio of the kernels' work.
      jax_step_cpu_s=round(statistics.median(jax_cpu), 3),
      torch_step_cpu_s=round(statistics.median(torch_cpu), 3),
      jax_over_torch_cpu=round(statistics.median(torch_cpu) / statistics.median(jax_cpu), 3),
      jax_compile_s=round(compile_s, 1),
      jax_matmul_tflops_per_s=round(benchmark.matmul_tflops(matmul_size, np.float32), 4),
      torch_matmul_tflops_per_s=round(torch_matmul_tflops(matmul_size), 4),
      matmul=f'{matmul_size}x{matmul_size} float32',
      torch_threads=torch.get_num_threads(), torch_adamw=adamw,
      # XLA:CPU's intra-op pool has one thread per CPU the process may use.
      jax_threads=len(os.sched_getaffinity(0)), cpus=os.cpu_count(),
      xla_flags=os.environ.get('XLA_FLAGS', ''), allocator=allocator.describe(),
      jax_text_length=jax_text.shape[1], torch_text_length=host_batch['text'].shape[1],
      jax_first_loss=round(jax_first_loss, 4), torch_first_loss=round(torch_first_loss, 4),
      jax_parameters=jax_parameter_counts(state.params),
      torch_parameters=torch_rils.parameter_counts(model),
      versions=dict(jax=jax.__version__, torch=torch.__version__),
      load_before=[round(x, 2) for x in load_before],
      load_after=[round(x, 2) for x in os.getloadavg()])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  print(json.dumps(run(f.config, f.rounds, f.steps, f.warmup, f.matmul_size, f.torch_threads,
                       f.adamw)))


if __name__ == '__main__':
  console.run(main)  # A user's mistake (a missing config file, ...) is one line.
