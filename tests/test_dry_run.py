"""The memory dry run, the platform presets and the multi-host start-up arguments."""

import jax
import pytest

from rils_jax import distributed
from rils_jax import dry_run
from rils_jax import platforms
from rils_jax import config_lib
from tests import test_configs
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


def test_activation_count_matches_a_hand_count_and_shrinks_with_accumulation():
  import jax.numpy as jnp
  # y = sin(x @ w): the backward pass keeps cos(x @ w), (B, 5); x and w are arguments.
  fn = lambda w, x: jnp.sin(x @ w).sum()
  args = (jnp.zeros((3, 5)), jnp.zeros((8, 3)))
  assert dry_run._residual_bytes(fn, args, batch_size=8, shards=1) == 8 * 5 * 4
  assert dry_run._residual_bytes(fn, args, batch_size=8, shards=4) == 2 * 5 * 4
  whole = dry_run.dry_run(_config(), compile_step=False)
  accum = dry_run.dry_run(_config(**{'optim.accum_steps': 2}), compile_step=False)
  assert accum['micro_batch_per_device'] == 1 and accum['config']['accum_steps'] == 2
  assert accum['activation_bytes'] < whole['activation_bytes']
  assert accum['cached_output_bytes'] > 0


def test_platform_presets_set_mesh_accumulation_and_dtype():
  c = test_configs._load('vit_b16', 'platform=gpu_8xh100')
  assert dict(c.mesh) == {'slice': 1, 'data': 1, 'fsdp': 8, 'tensor': 1}
  assert (c.optim.accum_steps, c.model.dtype, c.model.remat) == (2, 'bfloat16', 'block')
  assert c.platform.num_devices == 8 and c.input.batch_size == 4096
  c = test_configs._load('vit_l16', 'platform=tpu_v5e_256')
  assert c.optim.accum_steps == 1 and c.platform.accelerator == 'v5litepod-256'
  with pytest.raises(ValueError, match='unknown platform'):
    test_configs._load('vit_b16', 'platform=tpu_v9')
  c = config_lib.base_config()
  c.input.batch_size = 1000
  with pytest.raises(ValueError, match='not a multiple of platform gpu_8xh100'):
    platforms.apply_platform(c, 'gpu_8xh100')


def test_distributed_arguments_are_checked_and_single_process_needs_nothing(monkeypatch):
  for name in ('SLURM_STEP_NUM_TASKS', 'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize('auto') is False
  assert distributed.initialize('off', None, None, None) is False
  monkeypatch.setenv('SLURM_NTASKS', '16')
  assert distributed.cluster_tasks() == 16
  assert distributed.initialize('off') is False
  with pytest.raises(ValueError, match='go together'):
    distributed.initialize('auto', '127.0.0.1:1234', None, 0)
  with pytest.raises(ValueError, match='must be one of'):
    distributed.initialize('maybe')
  with pytest.raises(ValueError, match=r'process_id=2 in \[0, 2\)'):
    distributed.initialize('auto', '127.0.0.1:1234', 2, 2)


def test_multi_host_and_sharding_settings_fail_clearly(monkeypatch):
  from rils_jax import main as main_lib
  from rils_jax import sharding
  for bad in ('127.0.0.1:abc', 'notanaddress', '127.0.0.1:99999', '127.0.0.1:0', ' h:1'):
    with pytest.raises(ValueError, match='must be HOST:PORT'):
      distributed.initialize('auto', bad, 2, 0)
  assert distributed.check_address('[::1]:1234') == '[::1]:1234'
  with pytest.raises(ValueError, match='contradicts'):
    distributed.initialize('off', '127.0.0.1:1234', 2, 0)
  with pytest.raises(ValueError, match='num_processes=0 must be >= 1'):
    distributed.initialize('auto', '127.0.0.1:1234', 0, 0)
  c = tiny.tiny_config()
  c.sharding_rules = [('embed', 'fsdpp')]
  with pytest.raises(ValueError, match=r"unknown mesh axes \['fsdpp'\]"):
    sharding.rules_of(c)
  c.sharding_rules = ['embed']
  with pytest.raises(ValueError, match='must be a \\(logical name, mesh axes\\) pair'):
    sharding.rules_of(c)
  # A preset for another machine is refused before anything is read or compiled.
  c = test_configs._load('vit_b16', 'platform=tpu_v4_32')
  with pytest.raises(ValueError, match='tpu_v4_32 is for 16 devices .* this job has 8'):
    main_lib.validate_config(c)
  with pytest.raises(ValueError, match='sets bfloat16 compute'):
    test_configs._load('vit_b16', 'platform=tpu_v4_32,dtype=float32')
  with pytest.raises(ValueError, match='given twice'):
    test_configs._load('vit_b16', 'platform=tpu_v4_32,platform=gpu_8xh100')
  with pytest.raises(ValueError, match='chunk_size=-5 must be >= 0'):
    main_lib.validate_config(tiny.tiny_config(**{'loss.chunk_size': -5}))


def test_multislice_mesh_on_devices_without_slices():
  c = tiny.tiny_config(**{'mesh.slice': 2, 'mesh.data': -1})
  from rils_jax import sharding
  mesh = sharding.make_mesh(c)
  assert dict(mesh.shape) == {'slice': 2, 'data': 4, 'fsdp': 1, 'tensor': 1}
  assert [d.id for d in mesh.devices[0].reshape(-1)] == [0, 1, 2, 3]
