r"""Where a CPU train step's matmul time goes: rils_jax's dots (XLA) beside its PyTorch twin's
GEMMs (benchmarks/torch_rils.py), shape by shape, from one profiled run of each.

  .venv/bin/python benchmarks/dot_breakdown.py --config=configs/vit_b16.py \
      --config.input.batch_size=8

Prints two tables and one JSON line. XLA: every dot of the compiled step (plain, or inside a
oneDNN / YNNPACK / loop fusion), its FLOPs read from the optimised HLO (2 x lhs elements x rhs
free elements), its time from a `jax.profiler` trace of `--steps` steps. A dot's time is its
op's duration, whatever threads the library gave it; XLA:CPU also runs independent ops side by
side, so the dots' seconds can add up to more than the step (`xla_dot_s_per_step_s` > 1).
Column `alone`: the same product (shapes, dimension numbers, element type) run by itself in the
same process: a dot slow in the step but not alone is slowed by what runs beside it, not by its
layout. Column `shape` also counts the elementwise ops fused into a dot's kernel.
PyTorch: `aten::mm` / `addmm` / `bmm` from `torch.profiler` with input shapes, wall seconds of
the calling thread (each GEMM uses all of torch's threads; one GEMM at a time), and its fused
attention apart (its QK^T and PV are not GEMM calls; XLA's are dots, so XLA's dot FLOPs
include them).

Use it beside benchmarks/cpu_vs_pytorch.py (which times the steps without profilers): this says
which shapes make up a difference, not the difference itself. `--notorch` profiles rils_jax only
(any machine with JAX: GPU and TPU traces name their kernels differently, so the table is CPU's).
"""

import collections
import glob
import gzip
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import Dict, List, NamedTuple, Tuple

# Run as a script from the repository root: make `rils_jax`, `configs` and `benchmarks`
# importable without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rils_jax  # noqa: E402,F401  (before JAX and PyTorch allocate: rils_jax/allocator.py)
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from rils_jax import benchmark  # noqa: E402
from rils_jax import console  # noqa: E402
from rils_jax import sharding  # noqa: E402
from rils_jax import train_step as train_step_lib  # noqa: E402

_DEFINITION = re.compile(r'^\s*(?:ROOT )?%(\S+) = \(?(\w+)\[([\d,]*)\]')
_DOT = re.compile(r'^\s*(?:ROOT )?%(\S+) = \S+ dot\(%([^,\s]+), %([^,\s)]+)\)(.*)$')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%(\S+) ')
_CALLS = re.compile(r'^\s*(?:ROOT )?%(\S+) = .*\bcalls=%([^,\s]+)')


def _dims(text: str) -> List[int]:
  return [int(x) for x in text.split(',') if x]


def _attribute(attrs: str, name: str) -> List[int]:
  match = re.search(name + r'=\{([\d,]*)\}', attrs)
  return _dims(match.group(1)) if match else []


class Dot(NamedTuple):
  """One dot of an HLO module: FLOPs, a description, and what `lax.dot_general` needs to run
  the same product alone."""
  flops: int
  what: str
  lhs: Tuple[int, ...]
  rhs: Tuple[int, ...]
  dtype: str  # HLO element type of the lhs: 'f32', 'bf16', ...
  dimension_numbers: Tuple


def hlo_dots(hlo_text: str) -> Dict[str, List[Dot]]:
  """The dots of an optimised HLO module, by the instruction that runs them.

  Args:
    hlo_text: `compiled.as_text()` of a jitted function (one module, optimised).

  Returns:
    {instruction name: [Dot, ...]}: a top-level dot under its own name; a dot inside a fused
    computation under the fusion instruction(s) that call it (the names a profiler trace
    shows). `what` reads 'lhs dims x rhs dims, contracting l/r[, fused with N other ops]', N
    counting the fusion's instructions other than parameters, dots and bitcasts (elementwise
    work the dot's kernel does too). FLOPs = 2 x prod(lhs) x prod(rhs) / (contracted x batch
    elements of rhs): one multiply-add per output element and contracted element.
  """
  shapes, types, dots, calls = {}, {}, {}, collections.defaultdict(list)
  other_ops = collections.Counter()  # Instructions beside the dots, per computation.
  computation = ''
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and line.rstrip().endswith('{'):
      computation = header.group(1)
      continue
    definition = _DEFINITION.match(line)
    if definition:
      shapes[definition.group(1)] = _dims(definition.group(3))
      types[definition.group(1)] = definition.group(2)
      if not re.search(r' (parameter|dot|bitcast)\(', line):
        other_ops[computation] += 1
    called = _CALLS.match(line)
    if called:
      calls[called.group(2)].append(called.group(1))
    dot = _DOT.match(line)
    if dot:
      dots[dot.group(1)] = (computation, dot.group(2), dot.group(3), dot.group(4))
  out = collections.defaultdict(list)
  for name, (computation, lhs, rhs, attrs) in dots.items():
    lhs_shape, rhs_shape = shapes[lhs], shapes[rhs]
    numbers = ((_attribute(attrs, 'lhs_contracting_dims'),
                _attribute(attrs, 'rhs_contracting_dims')),
               (_attribute(attrs, 'lhs_batch_dims'), _attribute(attrs, 'rhs_batch_dims')))
    contracted = math.prod(lhs_shape[i] for i in numbers[0][0])
    batch = math.prod(lhs_shape[i] for i in numbers[1][0])
    flops = 2 * math.prod(lhs_shape) * (math.prod(rhs_shape) // (contracted * batch))
    what = (f'{lhs_shape}x{rhs_shape} contracting {_attribute(attrs, "lhs_contracting_dims")}'
            f'/{_attribute(attrs, "rhs_contracting_dims")}')
    if calls.get(computation) and other_ops[computation]:
      what += f', fused with {other_ops[computation]} other ops'
    for runner in calls.get(computation) or [name]:
      out[runner].append(Dot(flops, what, tuple(lhs_shape), tuple(rhs_shape), types[lhs],
                             numbers))
  return dict(out)


def trace_seconds(trace_dir: str, steps: int) -> Dict[str, float]:
  """Seconds per step of each traced op name (summed over threads) in the perfetto trace that
  `jax.profiler.trace(trace_dir, create_perfetto_trace=True)` wrote."""
  path = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True)[0]
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  seconds = collections.Counter()
  for event in events:
    if event.get('ph') == 'X':
      seconds[event.get('name', '')] += event.get('dur', 0) / 1e6 / steps
  return seconds


_DTYPES = {'f32': np.float32, 'bf16': jax.numpy.bfloat16, 'f16': np.float16, 'f64': np.float64}


def alone_gflops_per_s(dot: Dot, repeats: int = 5) -> float:
  """GFLOP/s of `dot`'s product run by itself (a jitted `lax.dot_general` on random operands of
  its shapes and element type; median of `repeats` after one warm-up), or NaN for an element type
  NumPy cannot make."""
  if dot.dtype not in _DTYPES:
    return float('nan')
  rng = np.random.default_rng(0)
  lhs, rhs = (jax.numpy.asarray(rng.standard_normal(shape), _DTYPES[dot.dtype])
              for shape in (dot.lhs, dot.rhs))
  product = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dot.dimension_numbers))
  product(lhs, rhs).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    product(lhs, rhs).block_until_ready()
    times.append(time.perf_counter() - start)
  return dot.flops / float(np.median(times)) / 1e9


def _table(rows, time_label: str, top: int) -> None:
  """rows: (seconds, FLOPs, calls, description, Dot or None), the `top` slowest printed."""
  print(f'  {time_label:>9} {"GFLOP":>8} {"GFLOP/s":>8} {"alone":>7} {"calls":>6}  shape')
  for seconds, flops, count, what, dot in sorted(rows, key=lambda r: -r[0])[:top]:
    rate = flops / seconds / 1e9 if seconds else 0.0
    alone = f'{alone_gflops_per_s(dot):7.1f}' if dot else f'{"":7}'
    print(f'  {seconds:9.3f} {flops / 1e9:8.2f} {rate:8.1f} {alone} {count:6d}  {what}')


def _report(title: str, rows, time_label: str, top: int, prefix: str) -> dict:
  """Prints `title` and the table of `rows` (as `_table`); returns the rows' totals as
  {prefix}_gflop, {prefix}_s and {prefix}_gflops_per_s."""
  seconds = sum(r[0] for r in rows)
  flops = sum(r[1] for r in rows)
  print(title)
  _table(rows, time_label, top)
  return {f'{prefix}_gflop': round(flops / 1e9, 1), f'{prefix}_s': round(seconds, 3),
          f'{prefix}_gflops_per_s': round(flops / seconds / 1e9, 1) if seconds else None}


def xla_breakdown(config, setup: train_step_lib.Setup, steps: int, warmup: int, top: int) -> dict:
  """Profiles `steps` rils_jax train steps; prints the dot table; returns the totals."""
  state = train_step_lib.create_train_state(setup, config.seed)
  host_batch = benchmark.random_batch(config, np.random.default_rng(0), setup.model.eot_id)
  batch = sharding.put_batch(host_batch, setup.mesh)
  compiled = train_step_lib.make_train_step(setup, config).lower(state, batch).compile()
  dots = hlo_dots(compiled.as_text())
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      start = time.perf_counter()
      for _ in range(steps):
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
      step_s = (time.perf_counter() - start) / steps
    seconds = trace_seconds(trace_dir, steps)
  groups = collections.defaultdict(lambda: [0.0, 0, 0, None])
  for name, found in dots.items():
    share = seconds.get(name, 0.0) / len(found)  # A fusion with two dots: split its time.
    kind = re.sub(r'[.\d]+$', '', name)
    for dot in found:
      group = groups[f'{kind}: {dot.what}']
      group[0] += share
      group[1] += dot.flops
      group[2] += 1
      group[3] = dot
  rows = [(s, f, c, what, dot) for what, (s, f, c, dot) in groups.items()]
  totals = _report(f'rils_jax (XLA), {step_s:.3f} s a step under the profiler; op seconds a '
                   'step:', rows, 'op s', top, 'xla_dot')
  return dict(xla_step_s=round(step_s, 3), **totals,
              xla_dot_s_per_step_s=round(totals['xla_dot_s'] / step_s, 2),
              xla_dots_untimed=sum(1 for name in dots if name not in seconds))


def torch_breakdown(config, eot_id: int, steps: int, warmup: int, top: int) -> dict:
  """Profiles `steps` PyTorch twin steps; prints the GEMM table; returns the totals."""
  import torch  # Only here: `--notorch` runs where PyTorch is not installed.
  from torch.profiler import ProfilerActivity, profile

  from benchmarks import torch_rils

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  torch.manual_seed(config.seed)
  host_batch = benchmark.random_batch(config, np.random.default_rng(0), eot_id)
  model = torch_rils.build_model(config, eot_id)
  step = torch_rils.make_train_step(model, torch_rils.make_optimizer(model, config, 'fused'),
                                    config)
  images, tokens = torch_rils.as_torch_batch(host_batch)
  for _ in range(warmup + 1):
    step(images, tokens)
  with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
    start = time.perf_counter()
    for _ in range(steps):
      step(images, tokens)
    step_s = (time.perf_counter() - start) / steps
  rows, attention_s = [], 0.0
  for event in prof.key_averages(group_by_input_shape=True):
    seconds = event.self_cpu_time_total / 1e6 / steps
    if 'scaled_dot_product' in event.key:
      attention_s += seconds
    if event.key not in ('aten::mm', 'aten::addmm', 'aten::bmm'):
      continue
    shapes = event.input_shapes
    lhs, rhs = (shapes[1], shapes[2]) if event.key == 'aten::addmm' else (shapes[0], shapes[1])
    flops = 2 * math.prod(lhs) * rhs[-1] * event.count / steps
    rows.append((seconds, flops, event.count // steps, f'{event.key}: {lhs}x{rhs}', None))
  totals = _report(f'PyTorch, {step_s:.3f} s a step under the profiler; wall seconds a step:',
                   rows, 'wall s', top, 'torch_gemm')
  return dict(torch_step_s=round(step_s, 3), **totals,
              torch_fused_attention_s=round(attention_s, 3), torch_threads=torch.get_num_threads())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.steps < 1 or f.warmup < 0 or f.top < 1:
    raise app.UsageError(f'--steps={f.steps} and --top={f.top} must be >= 1, --warmup={f.warmup} '
                         '>= 0')
  setup = train_step_lib.setup(f.config)
  result = xla_breakdown(f.config, setup, f.steps, f.warmup, f.top)
  if f.torch:
    result.update(torch_breakdown(f.config, setup.model.eot_id, f.steps, f.warmup, f.top))
  result.update(threads=len(os.sched_getaffinity(0)), xla_flags=os.environ.get('XLA_FLAGS', ''),
                rils_cpu_xla_flags=os.environ.get('RILS_CPU_XLA_FLAGS', ''))
  print(json.dumps(result))


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
  flags.DEFINE_integer('steps', 2, 'Profiled steps of each framework.')
  flags.DEFINE_integer('warmup', 2, 'Unprofiled steps after compilation.')
  flags.DEFINE_integer('top', 15, 'Rows of each table (the slowest shapes).')
  flags.DEFINE_bool('torch', True, 'Also profile the PyTorch twin.')
  flags.mark_flags_as_required(['config'])
  console.run(main)  # A user's mistake (a missing config file, ...) is one line.
