r"""The train step of one config under every loss kind, attention implementation and remat policy,
each at the largest batch that fits: one table.

  python -m rils_jax.benchmark_grid --config=configs/vit_b16.py:dtype=bfloat16
  benchmarks/accelerator.sh            # the same on a fresh GPU machine, wheels installed first

Each row is `rils_jax.benchmark.run` in this process, against one reference matmul measured
once at the start, so `mfu_measured` (model FLOP/s over that matmul's) compares rows fairly.
Rows run in `--remat` x `--kinds` x `--attention` order; a row that cannot run here (cuDNN
attention on a CPU, offload without host memory) is listed with the reason, and rows that the
time budget (`--budget_s`) leaves no room for are listed as skipped, so the command ends in time
on any machine.

The batch per device: `--per_device_batch`, or 0 (default) for the largest power of two that
fits the device's memory: the memory dry run's estimate (`rils_jax.dry_run`, from the traced
program, nothing compiled) chooses a first size, and the compiled step's buffers
(`memory_analysis`) confirm it before any step runs, halving until they fit. On a device that
reports no memory size (CPU) it is the config's batch.

Output: one JSON line per row (to stdout and `--out`), then a Markdown table.
"""

import json
import time
from typing import Any, Dict, List, Optional

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from rils_jax import benchmark
from rils_jax import console
from rils_jax import dry_run as dry_run_lib
from rils_jax.models import rils as rils_lib

# Of the device's memory, what the batch search may fill: the rest is XLA's workspace and the
# allocator's fragmentation, which neither the estimate nor `memory_analysis` see.
MEMORY_FRACTION = 0.85


def _define_flags():
  # Defined only when run as a command, so that importing this module registers no flags.
  config_flags.DEFINE_config_file('config', 'configs/vit_b16.py', 'Config file.',
                                  lock_config=True)
  flags.DEFINE_list('kinds', ['rils', 'clip', 'flip', 'mae'], 'config.loss.kind of each row.')
  flags.DEFINE_list('attention', ['xla', 'cudnn'], 'config.model.attention of each row.')
  flags.DEFINE_list('remat', ['none', 'block', 'full', 'offload'], 'config.model.remat.')
  flags.DEFINE_integer('per_device_batch', 0, 'Batch per device (0: the largest that fits).')
  flags.DEFINE_integer('max_per_device_batch', 2048, 'Upper end of the batch search.')
  flags.DEFINE_integer('steps', 5, 'Timed steps per row.')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps per row after compilation.')
  flags.DEFINE_integer('matmul_size', 0, 'Side of the reference matmul (0: benchmark default).')
  flags.DEFINE_float('budget_s', 420.0, 'Wall-clock seconds for all rows; rows that would not '
                     'end inside it are skipped.')
  flags.DEFINE_string('out', '', 'Also write the JSON lines here.')


def _with(config, kind: str, attention: str, remat: str, batch: int):
  c = config.copy_and_resolve_references()
  c.unlock()
  c.loss.kind, c.model.remat, c.input.batch_size = kind, remat, batch
  if 'attention' in c.model:
    c.model.attention = attention
  elif attention != 'xla':  # Before model.attention existed the step always used XLA's.
    raise ValueError(f'config.model.attention={attention!r}: this version has XLA attention only')
  c.optim.accum_steps = 1  # The batch search replaces accumulation.
  return c


def _memory_limit() -> int:
  stats = jax.devices()[0].memory_stats() or {}
  return int(MEMORY_FRACTION * stats.get('bytes_limit', 0))


def first_batch(config, limit: int, largest: int) -> int:
  """The largest power-of-two batch per device whose dry-run estimate fits in `limit` bytes.

  The estimate is linear in the batch (state + per-example activations), so two traced
  programs, at 1 and 2 examples per device, give it for every size.
  """
  devices = jax.device_count()

  def estimate(per_device):
    c = config.copy_and_resolve_references()
    c.input.batch_size = per_device * devices
    return dry_run_lib.dry_run(c, compile_step=False)['estimate_bytes']

  one, two = estimate(1), estimate(2)
  per_example = max(two - one, 1)
  batch = 1
  while batch * 2 <= largest and one + (batch * 2 - 1) * per_example <= limit:
    batch *= 2
  return batch


def run_row(config, kind: str, attention: str, remat: str, per_device_batch: int,
            largest: int, steps: int, warmup: int, matmul_size: int,
            reference_tflops: float, start_batch: int = 0) -> Dict[str, Any]:
  """Benchmarks one row; returns `benchmark.run`'s figures with the row's settings and
  `per_device_batch`, or the settings with `error` when the row cannot run here (that is
  reported, not raised). `start_batch` > 0 starts the search there instead of at the dry run's
  estimate (rows that differ in attention only need about the same memory).
  """
  row: Dict[str, Any] = dict(kind=kind, attention=attention, remat=remat)
  devices = jax.device_count()
  try:
    c = _with(config, kind, attention, remat, config.input.batch_size)
    rils_lib.build_model(c, eot_id=2)  # Refuses an implementation this backend cannot run.
    limit = _memory_limit()
    batch = per_device_batch or start_batch or (
        first_batch(c, limit, largest) if limit else max(c.input.batch_size // devices, 1))
    while True:
      try:
        out = benchmark.run(_with(config, kind, attention, remat, batch * devices), steps,
                            warmup, matmul_size, memory_limit_bytes=limit,
                            reference_tflops=reference_tflops)
        break
      except benchmark.DoesNotFit as e:
        if per_device_batch or batch == 1:
          raise
        logging.info('%s %s %s: batch %d per device does not fit (%s); halving', kind,
                     attention, remat, batch, e)
        batch //= 2
  except (ValueError, benchmark.DoesNotFit) as e:
    return {**row, 'error': str(e).splitlines()[0]}
  return {**row, 'per_device_batch': batch, **out}


def table(rows: List[Dict[str, Any]]) -> str:
  """A Markdown table of `run_row` results, one line per row."""
  head = ('| kind | attention | remat | batch/device | images/s | model TFLOP/s | MFU (measured '
          'peak) | MFU (datasheet) | HW TFLOP/s | step memory GiB | compile s |')
  lines = [head, '|' + '---|' * 11]
  for r in rows:
    if 'error' in r:
      lines.append(f"| {r['kind']} | {r['attention']} | {r['remat']} | {r['error']} |"
                   + ' |' * 7)
      continue
    mfu = f"{100 * r['mfu']:.1f}%" if r['mfu'] is not None else 'n/a'
    lines.append(
        f"| {r['kind']} | {r['attention']} | {r['remat']} | {r['per_device_batch']} | "
        f"{r['images_per_s']:.1f} | {r['model_tflops_per_s']:.2f} | "
        f"{100 * r['fraction_of_matmul']:.1f}% | {mfu} | {r['hardware_tflops_per_s']:.2f} | "
        f"{r['step_memory_bytes'] / 2**30:.2f} | {r['compile_s']:.1f} |")
  return '\n'.join(lines)


def run_grid(config, kinds, attentions, remats, per_device_batch: int = 0,
             largest: int = 2048, steps: int = 5, warmup: int = 2, matmul_size: int = 0,
             budget_s: float = 420.0, out: Optional[str] = None) -> List[Dict[str, Any]]:
  """Benchmarks every row (see the module docstring) and returns their results in order."""
  start = time.perf_counter()
  device = jax.devices()[0]
  size = matmul_size or (4096 if device.platform == 'cpu' else 8192)
  reference = benchmark.matmul_tflops(size, rils_lib.compute_dtype(config.model.dtype))
  rows, longest, starts = [], 0.0, {}
  for remat in remats:  # Remat outermost: a budget cut drops the same policies of every kind.
    for kind in kinds:
      for attention in attentions:
        left = budget_s - (time.perf_counter() - start)
        if left < longest * 1.2:  # The next row would likely end after the budget.
          row = dict(kind=kind, attention=attention, remat=remat,
                     error=f'skipped: {left:.0f} s of the time budget left')
        else:
          t = time.perf_counter()
          row = run_row(config, kind, attention, remat, per_device_batch, largest, steps,
                        warmup, matmul_size or size, reference, starts.get((kind, remat), 0))
          if 'error' not in row:
            longest = max(longest, time.perf_counter() - t)
            starts[(kind, remat)] = row['per_device_batch']
        row['reference_matmul_tflops_per_s'] = round(reference, 3)
        print(json.dumps(row), flush=True)
        if out:
          with open(out, 'a') as f:
            f.write(json.dumps(row) + '\n')
        rows.append(row)
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  device = jax.devices()[0]
  print(f'{jax.device_count()}x {device.device_kind}, jax {jax.__version__}; budget '
        f'{f.budget_s:.0f} s', flush=True)
  rows = run_grid(f.config, f.kinds, f.attention, f.remat, f.per_device_batch,
                  f.max_per_device_batch, f.steps, f.warmup, f.matmul_size, f.budget_s, f.out)
  print(table(rows), flush=True)


if __name__ == '__main__':
  _define_flags()
  console.run(main)
