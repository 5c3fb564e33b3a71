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

On GPUs, `initialize` then checks that the processes of this node use all of its GPUs
(`check_local_gpus`): one process per node with JAX's SLURM detection (which gives a process the
GPU of its SLURM_LOCALID) would otherwise train on one GPU per node without a word.
"""

import glob
import itertools
import os
import re
from typing import Mapping, Optional, Tuple

import jax
from absl import logging
from jax.sharding import PartitionSpec as P

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


def _count(value: Optional[str]) -> Optional[int]:
  """A count from an environment variable: '8', or SLURM's '8(x2)'; None when not a count."""
  match = re.fullmatch(r'\s*(\d+)(\(x\d+\))?\s*', value or '')
  return int(match.group(1)) if match else None


def node_gpus(environ: Optional[Mapping[str, str]] = None,
              proc_dir: str = '/proc/driver/nvidia/gpus',
              dev_dir: str = '/dev') -> Tuple[int, str]:
  """The GPUs this node has for the job, and where the number comes from ((0, '') if unknown).

  SLURM_GPUS_ON_NODE (the GPUs SLURM gave the job on this node) when set; otherwise what the
  NVIDIA driver shows, without loading any NVIDIA library: the smaller of the number of entries
  in /proc/driver/nvidia/gpus (one per GPU) and of /dev/nvidiaN device files (a container sees
  only the device files of its own GPUs).
  """
  environ = os.environ if environ is None else environ
  slurm = _count(environ.get('SLURM_GPUS_ON_NODE'))
  if slurm:
    return slurm, 'SLURM_GPUS_ON_NODE'
  found = []
  entries = glob.glob(os.path.join(proc_dir, '*'))
  if entries:
    found.append((len(entries), proc_dir))
  devices = [d for d in glob.glob(os.path.join(dev_dir, 'nvidia*'))
             if re.fullmatch(r'nvidia\d+', os.path.basename(d))]
  if devices:
    found.append((len(devices), os.path.join(dev_dir, 'nvidiaN')))
  return min(found, key=lambda f: f[0]) if found else (0, '')


def local_processes(environ: Optional[Mapping[str, str]] = None) -> int:
  """How many processes of this job run on this node: Open MPI's OMPI_COMM_WORLD_LOCAL_SIZE, or
  SLURM's tasks on this node (SLURM_STEP_TASKS_PER_NODE, else SLURM_TASKS_PER_NODE, such as
  '8(x2),4', at index SLURM_NODEID; else SLURM_NTASKS_PER_NODE); 1 when none is set."""
  environ = os.environ if environ is None else environ
  ompi = _count(environ.get('OMPI_COMM_WORLD_LOCAL_SIZE'))
  if ompi:
    return ompi
  node = _count(environ.get('SLURM_NODEID')) or 0
  for name in ('SLURM_STEP_TASKS_PER_NODE', 'SLURM_TASKS_PER_NODE'):
    per_node = []
    for part in environ.get(name, '').split(','):
      match = re.fullmatch(r'\s*(\d+)(?:\(x(\d+)\))?\s*', part)
      if not match:
        per_node = []
        break
      per_node += [int(match.group(1))] * int(match.group(2) or 1)
    if node < len(per_node) and per_node[node] > 0:
      return per_node[node]
  return _count(environ.get('SLURM_NTASKS_PER_NODE')) or 1


def unused_gpus(local_devices: int, gpus: int, source: str, processes: int) -> Optional[str]:
  """The warning when `processes` processes on a node, each with `local_devices` GPUs, use fewer
  than the node's `gpus` (from `source`); None when they use them all or `gpus` is unknown (0).
  """
  used = processes * local_devices
  if not gpus or used >= gpus:
    return None
  return (f'this node has {gpus} GPUs ({source}) but its {processes} process(es) use '
          f'{local_devices} each: {used} of {gpus} GPUs in use. Under SLURM, JAX gives each task '
          'the GPU of its SLURM_LOCALID, so run one task per GPU (sbatch --ntasks-per-node='
          f'{gpus} --gpus-per-node={gpus} launch/slurm.sbatch, or launch/slurm.sh '
          f'--gpus_per_node={gpus}) or one process per node with all its GPUs '
          '(launch/gpu_multinode.sh); CUDA_VISIBLE_DEVICES also hides GPUs')


def check_local_gpus(*, backend: Optional[str] = None, local_devices: Optional[int] = None,
                     gpus: Optional[Tuple[int, str]] = None,
                     processes: Optional[int] = None) -> Optional[str]:
  """Logs a warning when this node's processes leave some of its GPUs unused (`unused_gpus`);
  nothing off GPUs. (Under a platform preset, `train_step.check_platform` refuses such a run.)
  The arguments replace what is read from JAX (the backend, this process's local device count)
  and from the node (`node_gpus`, `local_processes`), for tests.

  Returns:
    The warning, or None.
  """
  backend = jax.default_backend() if backend is None else backend
  if backend != 'gpu':
    return None
  local_devices = jax.local_device_count() if local_devices is None else local_devices
  gpus = node_gpus() if gpus is None else gpus
  processes = local_processes() if processes is None else processes
  message = unused_gpus(local_devices, gpus[0], gpus[1], processes)
  if message:
    logging.warning('Unused GPUs: %s', message)
  return message


def initialize(mode: str = 'auto', coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None, process_id: Optional[int] = None) -> bool:
  """Starts the multi-controller runtime when this process is one of several.

  Must run before any other JAX call. On GPUs it then warns when this node's processes leave
  some of its GPUs unused (`check_local_gpus`).

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
    check_local_gpus()
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
  check_local_gpus()
  return True


def connect_collectives(mesh: jax.sharding.Mesh) -> int:
  """Makes XLA:CPU's cross-process communicators for every group of `mesh`'s axes, now.

  XLA:CPU (gloo) makes the communicator of a group of devices when a program first uses it, and
  waits only 30 s (fixed in XLA) for the other processes to join; a process whose first train
  step starts more than 30 s after its peers' (a loaded host compiling slowly) fails with
  "Gloo context initialization failed: DEADLINE_EXCEEDED". A communicator, once made, serves
  every later program in the process (measured: a second program ran 40 s late without error).
  So one psum over each combination of the axes larger than 1, run right after start-up while
  the processes are in step, makes every later collective wait as long as its peers need.

  Returns:
    The number of axis combinations connected: 0 in one process, and off CPU, where the
    communicators are NCCL's or the TPU's own (the 30 s deadline is gloo's).
  """
  if jax.process_count() == 1 or jax.default_backend() != 'cpu':
    return 0
  axes = [name for name, size in mesh.shape.items() if size > 1]
  groups = [g for r in range(1, len(axes) + 1) for g in itertools.combinations(axes, r)]

  def sums():
    # Varies along every axis, so that no psum folds into a multiplication by the axis size.
    index = sum(jax.lax.axis_index(name) for name in axes)
    return tuple(jax.lax.psum(index, group)[None] for group in groups)

  every_device = P(tuple(mesh.axis_names))
  connect = jax.jit(jax.shard_map(sums, mesh=mesh, in_specs=(),
                                  out_specs=(every_device,) * len(groups)))
  jax.block_until_ready(connect())
  return len(groups)
