"""Meshes and shardings: FSDP and tensor sharding against data parallelism, partition specs,
mesh and rule errors, multislice meshes, and global batches from process rows."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from rils_jax import sharding
from tests import tiny


def _config(**overrides):
  # eps = 1e-3: see test_train_step.test_eight_devices_match_one_device.
  return tiny.tiny_config(**{'optim.eps': 1e-3, **overrides})


def test_fsdp_and_tensor_meshes_match_data_parallelism_and_shard_the_state():
  batches = [tiny.random_batch(16, seed) for seed in range(2)]
  config = _config(**{'input.batch_size': 16})
  data_parallel = tiny.train(config, jax.devices(), 2, batches)  # mesh data=8.
  assert data_parallel[0].params['visual']['blocks_0']['mlp']['fc1']['kernel'].sharding.spec == P(
      None, None)  # Replicated.
  config.mesh = {'data': 1, 'fsdp': 8}
  fsdp = tiny.train(config, jax.devices(), 2, batches)
  tiny.assert_same_run(data_parallel, fsdp)
  state = fsdp[0]
  fc1 = state.params['visual']['blocks_0']['mlp']['fc1']['kernel']  # (32, 128)
  assert fc1.sharding.spec == P('fsdp', None)
  assert fc1.addressable_shards[0].data.shape == (4, 128)
  mu = optax.tree_utils.tree_get(state.opt_state, 'mu')['visual']['blocks_0']['mlp']['fc1']
  assert mu['kernel'].sharding.spec == P('fsdp', None)
  assert state.params['logit_scale'].sharding.spec == P()

  config.mesh = {'data': 2, 'fsdp': 2, 'tensor': 2}
  mixed = tiny.train(config, jax.devices(), 2, batches)
  tiny.assert_same_run(data_parallel, mixed)
  attn = mixed[0].params['visual']['blocks_0']['attn']
  assert attn['qkv']['kernel'].sharding.spec == P('fsdp', None, 'tensor', None)
  assert attn['proj']['kernel'].sharding.spec == P('tensor', None, 'fsdp')


def test_mesh_spec_replicates_dimensions_that_do_not_divide():
  mesh = sharding.make_mesh(_config(**{'mesh.data': 1, 'mesh.fsdp': 4, 'mesh.tensor': 2}))
  rules = sharding.DEFAULT_RULES
  # 3 heads over tensor=2: heads replicated; width 12 over fsdp=4: sharded.
  assert sharding.mesh_spec(('embed', None, 'heads', 'kv'), (12, 3, 3, 4), mesh, rules) == P(
      'fsdp', None, None, None)
  assert sharding.mesh_spec(('batch', 'length', 'act_embed'), (8, 5, 12), mesh, rules) == P(
      'fsdp', None, None)  # data has size 1, so the batch goes over fsdp only.
  assert sharding.mesh_spec(('embed',), (6,), mesh, rules) == P(None)


def test_mesh_errors_are_clear():
  config = tiny.tiny_config()
  config.mesh = {'data': 3}
  with pytest.raises(ValueError, match='needs 3 devices'):
    sharding.make_mesh(config)
  config.mesh = {'model': -1}
  with pytest.raises(ValueError, match="unknown axes \\['model'\\]"):
    sharding.make_mesh(config)
  config.mesh = {'data': -1, 'fsdp': -1}
  with pytest.raises(ValueError, match='at most one'):
    sharding.make_mesh(config)


def test_sharding_rules_are_checked():
  c = tiny.tiny_config()
  c.sharding_rules = [('embed', 'fsdpp')]
  with pytest.raises(ValueError, match=r"unknown mesh axes \['fsdpp'\]"):
    sharding.rules_of(c)
  c.sharding_rules = ['embed']
  with pytest.raises(ValueError, match='must be a \\(logical name, mesh axes\\) pair'):
    sharding.rules_of(c)


def test_multislice_mesh_on_devices_without_slices():
  c = tiny.tiny_config(**{'mesh.slice': 2, 'mesh.data': -1})
  mesh = sharding.make_mesh(c)
  assert dict(mesh.shape) == {'slice': 2, 'data': 4, 'fsdp': 1, 'tensor': 1}
  assert [d.id for d in mesh.devices[0].reshape(-1)] == [0, 1, 2, 3]


def test_global_batch_from_process_rows():
  config = tiny.tiny_config(**{'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2})
  mesh = sharding.make_mesh(config)
  assert sharding.process_rows(mesh, 16) == (0, 16)  # One process holds every row.
  batch = tiny.random_batch(16)
  batch['example_id'] = np.arange(16)
  placed = sharding.put_batch(batch, mesh)
  assert set(placed) == {'image', 'text', 'skipped'}  # Example ids stay on the host.
  np.testing.assert_array_equal(np.asarray(placed['image']), batch['image'])
  assert placed['skipped'].dtype == np.int32 and not np.asarray(placed['skipped']).any()
  # Rows over data x fsdp (4 shards of 4), replicated over tensor.
  assert placed['text'].sharding.spec == P(sharding.BATCH_AXES)
  assert {s.data.shape for s in placed['text'].addressable_shards} == {(4, 8)}
