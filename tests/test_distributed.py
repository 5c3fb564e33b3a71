"""Multi-host start-up arguments (rils_jax/distributed.py); real 2-process runs are in
tests/test_multihost.py."""

import pytest

from rils_jax import distributed


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


def test_coordinator_address_and_process_count_fail_clearly():
  for bad in ('127.0.0.1:abc', 'notanaddress', '127.0.0.1:99999', '127.0.0.1:0', ' h:1'):
    with pytest.raises(ValueError, match='must be HOST:PORT'):
      distributed.initialize('auto', bad, 2, 0)
  assert distributed.check_address('[::1]:1234') == '[::1]:1234'
  with pytest.raises(ValueError, match='contradicts'):
    distributed.initialize('off', '127.0.0.1:1234', 2, 0)
  with pytest.raises(ValueError, match='num_processes=0 must be >= 1'):
    distributed.initialize('auto', '127.0.0.1:1234', 0, 0)
