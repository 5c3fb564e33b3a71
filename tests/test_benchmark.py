"""The analytic FLOP count against XLA's own count, the benchmark's JSON figures, and the
accelerator benchmark script run on the CPU."""

import json
import os
import subprocess
import sys

import jax
import pytest

from rils_jax import benchmark
from rils_jax import flops
from rils_jax import sharding
from rils_jax import train_step as train_step_lib
from tests import tiny


def _config(kind):
  c = tiny.tiny_config(**{'loss.kind': kind, 'model.image_size': 64, 'input.batch_size': 32})
  c.model.vision = dict(width=128, depth=2, num_heads=4)
  c.model.decoder = dict(width=128, depth=1, num_heads=4)
  c.mae.decoder = dict(width=64, depth=2, num_heads=4)
  c.model.text = dict(width=128, num_layers=2, num_heads=4, context_length=16, vocab_size=64)
  return c


def _xla_cost(config):
  """XLA's cost analysis of the compiled train step of `config` on one device."""
  setup = train_step_lib.setup(config, jax.devices()[:1])
  state = train_step_lib.create_train_state(setup, config.seed)
  step = train_step_lib.make_train_step(setup, config)
  batch = sharding.put_batch(train_step_lib.dummy_batch(config, 32), setup.mesh)
  cost = step.lower(state, batch).compile().cost_analysis()
  return cost[0] if isinstance(cost, list) else cost


@pytest.mark.parametrize('kind,overrides', [
    ('rils', {}), ('clip', {}), ('flip', {}), ('mae', {}),
    ('rils', {'loss.contrastive': 'sigmoid'}), ('clip', {'model.freeze': 'image'})])
def test_analytic_flops_match_xla_cost_analysis(kind, overrides):
  config = tiny.apply_overrides(_config(kind), **overrides)
  cost = _xla_cost(config)
  analytic = flops.train_step_flops(config)
  # XLA also counts element-wise work, which the analytic (matmul-only) count leaves out.
  assert 0.95 <= cost['flops'] / analytic['total'] <= 1.1, (cost['flops'], analytic)
  if kind in ('clip', 'flip'):
    assert 'decoder' not in analytic and 'teacher_logits' not in analytic
  if kind == 'mae':
    assert 'text' not in analytic and 'clip_logits' not in analytic


@pytest.mark.parametrize('kind,overrides', [
    ('rils', {'optim.accum_steps': 2}), ('clip', {'optim.accum_steps': 4}),
    ('rils', {'model.remat': 'full'})])
def test_hardware_flops_match_xla_cost_analysis(kind, overrides):
  config = _config(kind)
  for key, value in overrides.items():
    group, name = key.split('.')
    config[group][name] = value
  cost = _xla_cost(config)
  model, hardware = flops.train_step_flops(config), flops.hardware_flops(config)
  coupled = sum(v for k, v in model.items() if k.endswith('_logits'))
  accum = config.optim.accum_steps
  # XLA counts a loop's body once, and GradCache loops over the micro-batches (its forward pass
  # and its re-run forward + backward), so XLA sees 1 / accum of the per-example work.
  expected = coupled + (hardware['total'] - coupled) / accum
  assert 0.95 <= cost['flops'] / expected <= 1.1, (cost['flops'], hardware)
  if accum > 1:  # The extra forward pass: a third of the gradient parts' model FLOPs, and more.
    assert hardware['grad_cache'] >= (model['total'] - coupled) / 3
    assert hardware['remat'] == 0
  else:
    assert hardware['grad_cache'] == 0 and hardware['remat'] > 0.2 * model['total']


def test_benchmark_reports_consistent_figures():
  config = _config('rils')
  config.mesh = {'data': -1}
  out = benchmark.run(config, steps=2, warmup=1, matmul_size=256)
  assert out['compile_s'] > 0 and out['step_s'] > 0
  assert out['images_per_s'] == pytest.approx(32 / out['step_s'], rel=0.01)
  assert out['model_flops_per_step'] == flops.train_step_flops(config)['total']
  assert out['model_tflops_per_s'] == pytest.approx(
      out['model_flops_per_step'] / out['step_s'] / 1e12, rel=0.01)
  assert out['fraction_of_matmul'] == pytest.approx(
      out['model_tflops_per_s'] / out['matmul_tflops_per_s'], rel=0.01)
  assert out['peak_memory_bytes'] > 0 and out['mfu'] is None  # CPU: no known peak.
  # Without accumulation or remat the step executes its model FLOPs.
  assert out['hardware_flops_per_step'] == out['model_flops_per_step']
  assert out['hardware_fraction_of_matmul'] == out['fraction_of_matmul']


def test_accelerator_script_runs_the_grid_on_cpu(tmp_path):
  """benchmarks/accelerator.sh on this CPU with the embedded default config: the XLA row runs at
  its batch, the cuDNN row says why it cannot, and --out holds the same rows as stdout."""
  out = tmp_path / 'grid.jsonl'
  r = subprocess.run(
      ['benchmarks/accelerator.sh', '--config=configs/default.py', '--config.input.batch_size=8',
       '--kinds=rils', '--remat=offload', '--attention=xla,cudnn', '--steps=1', '--warmup=0',
       '--matmul_size=256', f'--out={out}'],
      cwd=tiny.REPO_ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, 'PYTHON': sys.executable, 'XLA_FLAGS': ''})
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(x['attention'], x['remat']) for x in rows] == [('xla', 'offload'),
                                                         ('cudnn', 'offload')]
  xla, cudnn = rows
  assert xla['config']['variant'] == 'Ti/8' and xla['per_device_batch'] == 8  # CPU: config's.
  assert xla['images_per_s'] == pytest.approx(8 / xla['step_s'], rel=0.01)
  # Offload recomputes the attention matmuls: more hardware than model FLOPs.
  assert xla['hardware_flops_per_step'] > xla['model_flops_per_step']
  assert 'needs a GPU' in cudnn['error']
  assert '| rils | xla | offload | 8 |' in r.stdout and '| rils | cudnn | offload | config' in r.stdout


def test_packed_dots_times_two_forms_of_the_same_gradients():
  from benchmarks import packed_dots  # pylint: disable=g-import-not-at-top
  out = packed_dots.run(batch_size=2, width=32, full_tokens=5, masked_tokens=2, rounds=2)
  assert out['tokens'] == {'full': 10, 'masked': 4}
  assert out['max_gradient_difference'] < 1e-4, out
  assert len(out['rounds_apart']) == len(out['rounds_packed']) == 2
