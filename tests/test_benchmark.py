"""The analytic FLOP count against XLA's own count, and the benchmark's JSON figures."""

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
  c.model.text = dict(width=128, num_layers=2, num_heads=4, context_length=16, vocab_size=64)
  return c


@pytest.mark.parametrize('kind', ['rils', 'clip'])
def test_analytic_flops_match_xla_cost_analysis(kind):
  config = _config(kind)
  setup = train_step_lib.setup(config, jax.devices()[:1])
  state = train_step_lib.create_train_state(setup, config.seed)
  step = train_step_lib.make_train_step(setup, config)
  batch = sharding.put_batch(train_step_lib.dummy_batch(config, 32), setup.mesh)
  cost = step.lower(state, batch).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  analytic = flops.train_step_flops(config)
  # XLA also counts element-wise work, which the analytic (matmul-only) count leaves out.
  assert 0.95 <= cost['flops'] / analytic['total'] <= 1.1, (cost['flops'], analytic)
  if kind == 'clip':
    assert 'decoder' not in analytic and 'teacher_logits' not in analytic


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
