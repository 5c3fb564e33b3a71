"""benchmarks/dot_breakdown.py: the dots it reads from optimised HLO (FLOPs against exact and
analytic counts) and the trace names it times them by."""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import dot_breakdown
from rils_jax import flops
from rils_jax import sharding
from rils_jax import train_step as train_step_lib
from tests import tiny


def _two_dots(a, b, c, d):
  return jnp.tanh(a @ b).sum() + jnp.einsum('bij,bjk->bik', c, d).sum()


def _arrays():
  rng = np.random.default_rng(0)
  return [jnp.asarray(rng.standard_normal(s), jnp.float32)
          for s in ((64, 32), (32, 48), (4, 8, 16), (4, 16, 8))]


def test_hlo_dots_counts_a_plain_and_a_batched_dot_exactly():
  compiled = jax.jit(_two_dots).lower(*_arrays()).compile()
  dots = dot_breakdown.hlo_dots(compiled.as_text())
  found = sorted(dot.flops for runs in dots.values() for dot in runs)
  assert found == sorted([2 * 64 * 32 * 48, 2 * 4 * 8 * 16 * 8])
  # The parsed shapes and dimension numbers make a valid product: dot_general raises otherwise.
  assert all(dot_breakdown.alone_gflops_per_s(dot, repeats=1) > 0
             for runs in dots.values() for dot in runs)


def test_every_dot_is_timed_under_its_trace_name(tmp_path):
  arrays = _arrays()
  compiled = jax.jit(_two_dots).lower(*arrays).compile()
  dots = dot_breakdown.hlo_dots(compiled.as_text())
  compiled(*arrays).block_until_ready()
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    for _ in range(3):
      compiled(*arrays).block_until_ready()
  seconds = dot_breakdown.trace_seconds(str(tmp_path), steps=3)
  assert dots and all(seconds.get(name, 0.0) > 0.0 for name in dots), (dots, seconds)


def test_dots_of_the_rils_train_step_match_the_analytic_flops():
  # Widths of 128, as the default config: XLA turns dots of a few columns into reductions.
  config = tiny.tiny_config(**{'model.image_size': 32, 'input.batch_size': 16})
  config.model.vision = dict(width=128, depth=2, num_heads=4)
  config.model.decoder = dict(width=128, depth=1, num_heads=4)
  config.model.text = dict(width=128, num_layers=2, num_heads=4, context_length=16,
                           vocab_size=64)
  setup = train_step_lib.setup(config, jax.devices()[:1])
  state = train_step_lib.create_train_state(setup, config.seed)
  batch = sharding.put_batch(train_step_lib.dummy_batch(config, 16), setup.mesh)
  compiled = train_step_lib.make_train_step(setup, config).lower(state, batch).compile()
  total = sum(dot.flops for runs in dot_breakdown.hlo_dots(compiled.as_text()).values()
              for dot in runs)
  analytic = flops.train_step_flops(config)['total']
  # The analytic count also has the loss's few elementwise FLOPs: within 5%, not equal.
  assert abs(total - analytic) / analytic < 0.05, (total, analytic)

