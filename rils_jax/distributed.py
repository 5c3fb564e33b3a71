"""Multi-host start-up: JAX's multi-controller runtime (`jax.distributed.initialize`).

Every host runs the same command; each process drives its local devices, reads its own share of
the data, and the jitted step runs as one SPMD program over all devices. Three ways to start:

- Cloud TPU pods and SLURM (one task per GPU) or Open MPI: `--distributed=on` calls
  `jax.distributed.initialize()` with no arguments and JAX reads the cluster from the
  environment. Under `auto` (the default) this happens by itself when SLURM or Open MPI report
  more than one task.
- Any hosts (GPU machines without a scheduler, CPU for tests): `--coordinator_address=HOST:PORT
  --num_processes=N --process_id=I` on each host (`launch/gpu_multinode.sh` does this).
- One process (laptop, one GPU host, one TPU VM): nothing to do; `--distributed=off` makes sure.
"""

import os
import re
from typing import Optional

import jax
from absl import logging

MODES = ('auto', 'on', 'off')
# host:port, host:port with an IPv6 host in brackets; the port is checked for range below.
_ADDRESS = re.compile(r'^(\[[0-9A-Fa-f:.]+\]|[^:\s\[\]]+):([0-9]{1,5})$')


def check_address(address: str) -> str:
  """Returns `address` if it is 'host:port' with a port in 1..65535.

  Raises:
    ValueError: otherwise (JAX would crash or hang on it).
  """
  match = _ADDRESS.match(address)
  if not match or not 1 <= int(match.group(2)) <= 65535:
    raise ValueError(f'--coordinator_address={address!r} must be HOST:PORT with a port in '
                     '1..65535 (an IPv6 host in brackets: [::1]:1234)')
  return address


def cluster_tasks() -> int:
  """Number of tasks that SLURM or Open MPI say this job has (1 when neither is present)."""
  for name in ('SLURM_STEP_NUM_TASKS', 'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    if os.environ.get(name, '').isdigit():
      return int(os.environ[name])
  return 1


def initialize(mode: str = 'auto', coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None, process_id: Optional[int] = None) -> bool:
  """Starts the multi-controller runtime when this process is one of several.

  Must run before any other JAX call.

  Args:
    mode: 'off' (single process), 'on' (always initialise; arguments that are None are
      detected by JAX from the cluster environment) or 'auto' (initialise when
      `coordinator_address` is given or `cluster_tasks()` > 1).
    coordinator_address: 'host:port' of process 0's coordinator service.
    num_processes: total number of processes.
    process_id: this process's index in [0, num_processes).

  Returns:
    True when the runtime was initialised.

  Raises:
    ValueError: for an unknown mode, a coordinator address without the process count and
      index (or the reverse), a malformed address, a bad process count or index, or manual
      settings with mode 'off'.
    RuntimeError: when mode 'on' finds no cluster to join.
  """
  if mode not in MODES:
    raise ValueError(f'--distributed must be one of {MODES}, got {mode!r}')
  manual = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in manual) and any(v is None for v in manual):
    raise ValueError('--coordinator_address, --num_processes and --process_id go together; got '
                     f'{coordinator_address!r}, {num_processes!r}, {process_id!r}')
  if coordinator_address is not None:
    if mode == 'off':
      raise ValueError('--distributed=off contradicts --coordinator_address, --num_processes '
                       'and --process_id; drop one or the other')
    check_address(coordinator_address)
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f'--num_processes={num_processes} must be >= 1 and --process_id='
                       f'{process_id} in [0, {num_processes})')
  if mode == 'off' or (mode == 'auto' and coordinator_address is None and cluster_tasks() <= 1):
    return False
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  except ValueError as e:
    raise RuntimeError(
        f'--distributed={mode} found no cluster to join (JAX said: {e}). JAX detects Cloud TPU '
        'pods, SLURM and Open MPI jobs; elsewhere pass --coordinator_address, --num_processes '
        'and --process_id, or use --distributed=off for one process.') from e
  logging.info('Process %d of %d: %d local of %d devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
