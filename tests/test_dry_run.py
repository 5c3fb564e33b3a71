"""The memory dry run: per-device bytes of the state and of the activations under FSDP, remat
and accumulation, and XLA's buffer assignment."""

import jax
import jax.numpy as jnp

from rils_jax import dry_run
from tests import tiny


def _config(**overrides):
  c = tiny.tiny_config(**{'input.batch_size': 16, **overrides})
  c.model.vision = dict(width=64, depth=2, num_heads=2)
  c.model.decoder = dict(width=64, depth=1, num_heads=2)
  return c


def test_dry_run_reports_fsdp_savings_and_remat_savings():
  assert jax.device_count() == 8
  dp = dry_run.dry_run(_config())
  fsdp = dry_run.dry_run(_config(**{'mesh.data': 1, 'mesh.fsdp': 8}))
  assert dp['num_params'] == fsdp['num_params']
  assert dp['params_bytes'] > 4 * dp['num_params'] * 0.99  # float32, replicated.
  # Every weight matrix has a dimension divisible by 8; only a few small vectors replicate.
  assert fsdp['params_bytes'] < 0.15 * dp['params_bytes']
  assert fsdp['opt_state_bytes'] < 0.15 * dp['opt_state_bytes']
  for r in (dp, fsdp):
    x = r['xla_cpu']
    assert x['peak_bytes'] == (x['argument_bytes'] + x['output_bytes'] - x['alias_bytes'] +
                               x['temp_bytes'])
    assert r['micro_batch_per_device'] == 2
    assert r['estimate_bytes'] == (r['params_bytes'] + r['opt_state_bytes'] + r['grads_bytes'] +
                                   r['activation_bytes'])
  # Rematerialisation: each policy keeps less for the backward pass.
  block = dry_run.dry_run(_config(**{'model.remat': 'block'}), compile_step=False)
  full = dry_run.dry_run(_config(**{'model.remat': 'full'}), compile_step=False)
  assert full['activation_bytes'] < block['activation_bytes'] < 0.5 * dp['activation_bytes']
  # Offload keeps what 'block' keeps, its matmul outputs in host memory instead of the device's.
  offload = dry_run.dry_run(_config(**{'model.remat': 'offload'}), compile_step=False)
  assert block['host_offload_bytes'] == 0 and offload['host_offload_bytes'] > 0
  assert (offload['activation_bytes'] + offload['host_offload_bytes'] ==
          block['activation_bytes'])
  assert offload['activation_bytes'] < 0.5 * block['activation_bytes']
  assert offload['estimate_bytes'] == (offload['params_bytes'] + offload['opt_state_bytes'] +
                                       offload['grads_bytes'] + offload['activation_bytes'])


def test_activation_count_matches_a_hand_count_and_shrinks_with_accumulation():
  # y = sin(x @ w): the backward pass keeps cos(x @ w), (B, 5); x and w are arguments.
  fn = lambda w, x: jnp.sin(x @ w).sum()
  args = (jnp.zeros((3, 5)), jnp.zeros((8, 3)))
  assert dry_run._residual_bytes(fn, args, batch_size=8, shards=1) == (8 * 5 * 4, 0)
  assert dry_run._residual_bytes(fn, args, batch_size=8, shards=4) == (2 * 5 * 4, 0)
  whole = dry_run.dry_run(_config(), compile_step=False)
  accum = dry_run.dry_run(_config(**{'optim.accum_steps': 2}), compile_step=False)
  assert accum['micro_batch_per_device'] == 1 and accum['config']['accum_steps'] == 2
  assert accum['activation_bytes'] < whole['activation_bytes']
  assert accum['cached_output_bytes'] > 0
