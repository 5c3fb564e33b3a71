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


# --- Unused GPUs (distributed.check_local_gpus) ---------------------------------------------------


def _fake_node(tmp_path, proc_gpus, dev_gpus):
  """A /proc/driver/nvidia/gpus folder with `proc_gpus` entries and a /dev with `dev_gpus`
  /dev/nvidiaN files (plus the driver's other device files, which are not GPUs)."""
  proc, dev = tmp_path / 'gpus', tmp_path / 'dev'
  proc.mkdir(parents=True)
  dev.mkdir()
  for i in range(proc_gpus):
    (proc / f'0000:{i:02x}:00.0').mkdir()
  for i in range(dev_gpus):
    (dev / f'nvidia{i}').touch()
  for name in ('nvidiactl', 'nvidia-uvm', 'nvidia-uvm-tools', 'nvidia-caps'):
    (dev / name).touch()
  return str(proc), str(dev)


def test_node_gpus_are_counted_from_slurm_or_the_driver(tmp_path):
  proc, dev = _fake_node(tmp_path, 8, 8)
  assert distributed.node_gpus({}, proc, dev) == (8, proc)
  # SLURM's count of the job's GPUs on this node comes first.
  assert distributed.node_gpus({'SLURM_GPUS_ON_NODE': '4'}, proc, dev) == (4, 'SLURM_GPUS_ON_NODE')
  # A container sees the proc entries of the host but only its own device files: the fewer.
  proc2, dev2 = _fake_node(tmp_path / 'container', 8, 2)
  assert distributed.node_gpus({}, proc2, dev2) == (2, f'{dev2}/nvidiaN')
  empty = tmp_path / 'none'
  empty.mkdir()
  assert distributed.node_gpus({}, str(empty / 'gpus'), str(empty)) == (0, '')


def test_local_processes_from_slurm_and_open_mpi():
  assert distributed.local_processes({}) == 1
  assert distributed.local_processes({'OMPI_COMM_WORLD_LOCAL_SIZE': '8'}) == 8
  assert distributed.local_processes({'SLURM_STEP_TASKS_PER_NODE': '8(x2)'}) == 8
  uneven = {'SLURM_TASKS_PER_NODE': '8(x2),3', 'SLURM_NODEID': '2'}
  assert distributed.local_processes(uneven) == 3
  assert distributed.local_processes({'SLURM_NTASKS_PER_NODE': '1'}) == 1
  # The step's own layout wins over the job's.
  assert distributed.local_processes({'SLURM_STEP_TASKS_PER_NODE': '1(x2)',
                                      'SLURM_TASKS_PER_NODE': '8(x2)'}) == 1


def test_one_process_per_node_with_one_gpu_warns(monkeypatch):
  warnings = []
  monkeypatch.setattr(distributed.logging, 'warning', lambda *a: warnings.append(a[0] % a[1:]))
  # sbatch --nodes=2 --gpus-per-node=8 with one task per node: JAX gives the task 1 GPU.
  message = distributed.check_local_gpus(backend='gpu', local_devices=1,
                                         gpus=(8, 'SLURM_GPUS_ON_NODE'), processes=1)
  assert message == (
      'this node has 8 GPUs (SLURM_GPUS_ON_NODE) but its 1 process(es) use 1 each: 1 of 8 GPUs '
      'in use. Under SLURM, JAX gives each task the GPU of its SLURM_LOCALID, so run one task per '
      'GPU (sbatch --ntasks-per-node=8 --gpus-per-node=8 launch/slurm.sbatch, or launch/slurm.sh '
      '--gpus_per_node=8) or one process per node with all its GPUs (launch/gpu_multinode.sh); '
      'CUDA_VISIBLE_DEVICES also hides GPUs')
  assert warnings == ['Unused GPUs: ' + message]


def test_all_gpus_in_use_or_not_a_gpu_gives_no_warning(monkeypatch):
  warnings = []
  monkeypatch.setattr(distributed.logging, 'warning', lambda *a: warnings.append(a))
  node = (8, '/proc/driver/nvidia/gpus')
  # One process per GPU (slurm.sh): each sees 1 device by design.
  assert distributed.check_local_gpus(backend='gpu', local_devices=1, gpus=node, processes=8) is None
  # One process per node with all its GPUs (gpu_multinode.sh, xpk, jobset).
  assert distributed.check_local_gpus(backend='gpu', local_devices=8, gpus=node, processes=1) is None
  # Unknown GPU count, TPU, CPU: nothing to say.
  assert distributed.check_local_gpus(backend='gpu', local_devices=1, gpus=(0, ''), processes=1) is None
  assert distributed.check_local_gpus(backend='tpu', local_devices=4, gpus=node, processes=1) is None
  assert distributed.check_local_gpus() is None  # This machine: CPU.
  assert warnings == []
  # Half the GPUs hidden (CUDA_VISIBLE_DEVICES=0,1,2,3 on one process) is said.
  assert '4 of 8 GPUs in use' in distributed.check_local_gpus(
      backend='gpu', local_devices=4, gpus=node, processes=1)
  assert len(warnings) == 1


def test_initialize_checks_the_gpus_of_a_single_process(monkeypatch):
  calls = []
  monkeypatch.setattr(distributed, 'check_local_gpus', lambda: calls.append(1))
  for name in ('SLURM_STEP_NUM_TASKS', 'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize('auto') is False
  assert calls == [1]
